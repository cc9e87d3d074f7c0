//! Kernel-in-the-loop checks run inside the test VM (see `tests/vm/`), built statically.
//!
//! - `vmtest latency N TEMPLATE`: N cold attaches (claim → connect → ready → open) and closes of
//!   fresh overlays of TEMPLATE, then N attaches from pre-connected (warm) slots (bind + page
//!   cache flush only; each checked to read the template, not what the kernel cached before the
//!   bind); prints p50/p95 of each.
//! - `vmtest invalid TEMPLATE`: a connect the kernel must refuse (block size 8192 > PAGE_SIZE);
//!   checks the error is `Refused { EINVAL }` and the slot was released and is quiescent.
//! - `vmtest netlink TEMPLATE`: `NBD_CMD_STATUS` of all devices and of one, and
//!   `NBD_CMD_RECONFIGURE` of a connected device, against the real kernel.
//! - `vmtest claim-all`: claims every free slot, prints how many and what the quiescence check
//!   refused, releases them.
//!
//! Every check prints `PASS <name>` or `FAIL <name>: <why>` and exits non-zero on failure.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use rootfork_kernel::netlink::{chain, NbdControl, ReconfigureRequest};
use rootfork_kernel::{
    AttachError, AttachOptions, Attacher, DevicePool, HostNodes, NbdDispatcher, NbdNetlink,
    NlError, PoolConfig, SwitchableDevice, WarmSlot,
};
use rootfork_nbd::ServeOptions;

fn overlay(template: &Path, cache: &Path) -> Arc<dyn BlockDevice> {
    let t = TemplateFile::open(&TemplatePath::new(template)).expect("template");
    let _ = std::fs::remove_file(cache);
    Arc::new(Overlay::create(Arc::new(t), cache, OverlayOptions::default()).expect("overlay"))
}

fn attacher() -> Attacher {
    let pool = DevicePool::new(PoolConfig::default());
    let control = Arc::new(NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink"));
    Attacher::new(pool, control, Arc::new(HostNodes))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn latency(n: usize, template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let at = attacher();
    let (mut attach, mut close) = (Vec::new(), Vec::new());
    for i in 0..n {
        let d = NbdDispatcher::new(
            overlay(template, Path::new("/tmp/lat.cache")),
            ServeOptions::default(),
        );
        let opts = AttachOptions {
            sandbox: format!("lat-{i}"),
            ..Default::default()
        };
        let t0 = Instant::now();
        let a = rt
            .block_on(at.attach(&d, &opts))
            .map_err(|e| format!("attach {i}: {}", chain(&e)))?;
        attach.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        rt.block_on(a.close())
            .map_err(|e| format!("close {i}: {}", chain(&e)))?;
        close.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "LATENCY cold_attach n={n} p50_ms={:.2} p95_ms={:.2} max_ms={:.2}",
        pct(&mut attach, 0.5),
        pct(&mut attach, 0.95),
        pct(&mut attach, 1.0)
    );
    println!(
        "LATENCY close n={n} p50_ms={:.2} p95_ms={:.2} max_ms={:.2}",
        pct(&mut close, 0.5),
        pct(&mut close, 0.95),
        pct(&mut close, 1.0)
    );
    let mut warm = Vec::new();
    let head = std::fs::read(template).map_err(|e| e.to_string())?;
    for i in 0..n {
        let size = head.len() as u64;
        let sw = Arc::new(SwitchableDevice::new(size, 4096));
        let d = NbdDispatcher::new(sw.clone(), ServeOptions::default());
        let opts = AttachOptions {
            sandbox: "warm".into(),
            ..Default::default()
        };
        let a = rt
            .block_on(at.attach(&d, &opts))
            .map_err(|e| format!("pre-connect {i}: {}", chain(&e)))?;
        let slot = WarmSlot::new(a, sw);
        let dev = overlay(template, Path::new("/tmp/warm.cache"));
        slot.fits(&*dev).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let a = slot
            .bind(dev, &format!("warm-{i}"))
            .map_err(|e| format!("bind {i}: {}", chain(&e)))?;
        warm.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut b = vec![0u8; 65536];
        a.file()
            .read_exact_at(&mut b, 0)
            .map_err(|e| format!("read {i}: {}", chain(&e)))?;
        if b[..] != head[..65536] {
            return Err(format!("warm slot {i} served stale (pre-bind) data"));
        }
        rt.block_on(a.close())
            .map_err(|e| format!("close warm {i}: {}", chain(&e)))?;
    }
    println!(
        "LATENCY warm_attach n={n} p50_ms={:.3} p95_ms={:.3} max_ms={:.3}",
        pct(&mut warm, 0.5),
        pct(&mut warm, 0.95),
        pct(&mut warm, 1.0)
    );
    let m = at.pool().metrics();
    println!("METRICS {}", serde_json::to_string(&m).unwrap_or_default());
    if m.claimed != 0 {
        return Err(format!("{} slots still claimed", m.claimed));
    }
    Ok(())
}

fn invalid(template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let at = attacher();
    let d = NbdDispatcher::new(
        overlay(template, Path::new("/tmp/invalid.cache")),
        ServeOptions::default(),
    );
    let opts = AttachOptions {
        sandbox: "invalid".into(),
        block_size: 8192,
        ..Default::default()
    };
    match rt.block_on(at.attach(&d, &opts)) {
        Ok(a) => Err(format!(
            "the kernel accepted block size 8192 on {:?}",
            a.device_path()
        )),
        Err(AttachError::Connect {
            index,
            source: NlError::Refused { errno },
        }) if errno == libc::EINVAL => {
            println!("invalid connect on nbd{index} refused: errno {errno} (EINVAL)");
            let m = at.pool().metrics();
            if m.claimed != 0 {
                return Err("the slot is still claimed".into());
            }
            if m.failures_by_errno.get(&libc::EINVAL) != Some(&1) {
                return Err(format!("failure not counted: {:?}", m.failures_by_errno));
            }
            let st = at.pool().sysfs().slot(index).map_err(|e| e.to_string())?;
            st.check_quiescent()
                .map_err(|w| format!("nbd{index} not quiescent: {w}"))?;
            // And the same slot can be claimed again.
            drop(
                at.pool()
                    .claim("after-invalid")
                    .map_err(|e| e.to_string())?,
            );
            Ok(())
        }
        Err(e) => Err(format!("unexpected error: {e:?}")),
    }
}

fn netlink(template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let nl = NbdNetlink::open(Duration::from_secs(10)).map_err(|e| chain(&e))?;
    let before = nl.status(None).map_err(|e| chain(&e))?;
    if before.len() < 16 || before.iter().any(|d| d.connected) {
        return Err(format!("STATUS before: {before:?}"));
    }
    let at = attacher();
    let d = NbdDispatcher::new(
        overlay(template, Path::new("/tmp/netlink.cache")),
        ServeOptions::default(),
    );
    let opts = AttachOptions {
        sandbox: "netlink".into(),
        ..Default::default()
    };
    let a = rt.block_on(at.attach(&d, &opts)).map_err(|e| chain(&e))?;
    let one = nl.status(Some(a.index())).map_err(|e| chain(&e))?;
    let all = nl.status(None).map_err(|e| chain(&e))?;
    let connected: Vec<u32> = all
        .iter()
        .filter(|d| d.connected)
        .map(|d| d.index)
        .collect();
    println!("STATUS nbd{}: {one:?}; connected: {connected:?}", a.index());
    if one.len() != 1 || !one[0].connected || connected != vec![a.index()] {
        return Err("STATUS does not show exactly the attached device connected".into());
    }
    let backend = at
        .pool()
        .sysfs()
        .slot(a.index())
        .map_err(|e| e.to_string())?
        .backend;
    nl.reconfigure(&ReconfigureRequest {
        index: a.index(),
        timeout_secs: Some(60),
        backend_identifier: backend,
        ..Default::default()
    })
    .map_err(|e| format!("RECONFIGURE: {}", chain(&e)))?;
    let idx = a.index();
    rt.block_on(a.close()).map_err(|e| chain(&e))?;
    let after = nl.status(Some(idx)).map_err(|e| chain(&e))?;
    if after.iter().any(|d| d.connected) {
        return Err(format!("STATUS after close: {after:?}"));
    }
    // Disconnecting a device that is not connected is refused with a classified errno.
    match nl.disconnect(idx) {
        Err(NlError::Refused { errno }) => {
            println!("DISCONNECT of an idle device refused: errno {errno}")
        }
        Ok(()) => println!("DISCONNECT of an idle device accepted"),
        Err(e) => return Err(format!("DISCONNECT idle: {}", chain(&e))),
    }
    Ok(())
}

fn claim_all() -> Result<(), String> {
    let pool = DevicePool::new(PoolConfig::default());
    let mut held = Vec::new();
    while let Ok(l) = pool.claim("claim-all") {
        held.push(l);
    }
    let m = pool.metrics();
    println!(
        "CLAIM_ALL claimed={} not_quiescent={}",
        held.len(),
        serde_json::to_string(&m.not_quiescent_skips).unwrap_or_default()
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (name, r) = match args.get(1).map(String::as_str) {
        Some("latency") if args.len() == 4 => (
            "latency",
            latency(args[2].parse().expect("N"), Path::new(&args[3])),
        ),
        Some("invalid") if args.len() == 3 => ("invalid", invalid(Path::new(&args[2]))),
        Some("claim-all") => ("claim-all", claim_all()),
        Some("netlink") if args.len() == 3 => ("netlink", netlink(Path::new(&args[2]))),
        _ => {
            eprintln!(
                "usage: vmtest latency N TEMPLATE | invalid TEMPLATE | netlink TEMPLATE | claim-all"
            );
            std::process::exit(2);
        }
    };
    match r {
        Ok(()) => println!("PASS {name}"),
        Err(e) => {
            println!("FAIL {name}: {e}");
            std::process::exit(1);
        }
    }
}
