//! The kernel provider against the real `nbd` driver, run inside the kernel test VM (built
//! statically by `tests/boot/kernel-vm.sh`; the host has no `nbd` module).
//!
//! `kernel_vm TEMPLATE WORKDIR`: attach a kernel provider over TEMPLATE, check `path()` is a block
//! device that reads as the template, write through `/dev/nbdN`, pause (`export_diff`), close
//! (slot quiescent), resume over template + diff on a new device and read the write back; the
//! template's checksum must not change. Prints `PASS <name>` / `FAIL <name>: <why>` and
//! `RESULT pass=N fail=M`; exits non-zero on any failure.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_block::{OverlayOptions, TemplatePath};
use rootfork_kernel::{AttachOptions, Attacher, DevicePool, HostNodes, NbdNetlink, PoolConfig};
use rootfork_nbd::ServeOptions;
use rootfork_provider::{BaseImage, KernelConfig, KernelProvider, Provider};
use sha2::{Digest, Sha256};

struct Report {
    pass: u32,
    fail: u32,
}

impl Report {
    fn check(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Ok(()) => {
                println!("PASS {name}");
                self.pass += 1;
            }
            Err(why) => {
                println!("FAIL {name}: {why}");
                self.fail += 1;
            }
        }
    }
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).expect("read template")))
}

fn provider(base: BaseImage, work: &Path, name: &str) -> KernelProvider {
    let pool = DevicePool::new(PoolConfig::default());
    let control = Arc::new(NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink family"));
    let attacher = Attacher::new(pool, control, Arc::new(HostNodes));
    KernelProvider::new(
        KernelConfig {
            base,
            cache: work.join(format!("{name}.cache")),
            overlay: OverlayOptions::default(),
            attach: AttachOptions {
                sandbox: name.into(),
                ..AttachOptions::default()
            },
            serve: ServeOptions::default(),
        },
        attacher,
    )
}

fn slot_quiescent(dev: &Path) -> Result<(), String> {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let sys = PathBuf::from("/sys/block").join(&name);
    let size = std::fs::read_to_string(sys.join("size")).map_err(|e| e.to_string())?;
    if size.trim() != "0" {
        return Err(format!("{name} size is {}", size.trim()));
    }
    if std::fs::read_to_string(sys.join("pid")).is_ok_and(|p| !p.trim().is_empty()) {
        return Err(format!("{name} still has a pid"));
    }
    Ok(())
}

async fn run(template: &Path, work: &Path, r: &mut Report) {
    let before = sha(template);
    let tpath = TemplatePath::new(template);
    let block = vec![0xC3u8; 4096];
    let offset = 4096 * 17;

    let mut p = provider(BaseImage::Template(tpath.clone()), work, "kvm1");
    let t = Instant::now();
    p.start().expect("start");
    let dev = match p
        .path(Duration::from_secs(60), std::future::pending())
        .await
    {
        Ok(d) => d,
        Err(e) => {
            r.check("attach", Err(e.to_string()));
            return;
        }
    };
    println!(
        "LATENCY kernel-provider start->ready {:?} on {}",
        t.elapsed(),
        dev.path().display()
    );
    r.check(
        "path-is-block-device",
        if dev.is_block() {
            Ok(())
        } else {
            Err(format!("{} is not a block device", dev.path().display()))
        },
    );
    let devpath = dev.path().to_owned();
    let dev_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&devpath)
        .expect("open device");
    let mut got = vec![0u8; 1 << 20];
    dev_file.read_exact_at(&mut got, 0).expect("read device");
    let want = std::fs::read(template).expect("template")[..1 << 20].to_vec();
    r.check(
        "reads-as-template",
        if got == want {
            Ok(())
        } else {
            Err("first MiB differs".into())
        },
    );
    dev_file.write_all_at(&block, offset).expect("write device");
    // No explicit fsync here: export_diff must flush the device (fsync + BLKFLSBUF) itself.
    drop(dev_file);

    let paused = match p.export_diff(&work.join("kvm1.diff")).await {
        Ok(pd) => pd,
        Err(e) => {
            r.check("export-diff", Err(e.to_string()));
            return;
        }
    };
    let covered = paused
        .map
        .runs
        .iter()
        .any(|run| run.offset <= offset && run.end() >= offset + 4096);
    r.check(
        "export-diff",
        if covered {
            Ok(())
        } else {
            Err(format!("write missing from {:?}", paused.map.runs))
        },
    );
    r.check("close", p.close().await.map_err(|e| e.to_string()));
    r.check(
        "close-idempotent",
        p.close().await.map_err(|e| e.to_string()),
    );
    r.check("slot-quiescent-after-close", slot_quiescent(&devpath));
    r.check(
        "cache-removed",
        if work.join("kvm1.cache").exists() {
            Err("cache left".into())
        } else {
            Ok(())
        },
    );

    let mut q = provider(
        BaseImage::Resumed {
            template: tpath,
            paused,
        },
        work,
        "kvm1-resumed",
    );
    q.start().expect("start resumed");
    match q
        .path(Duration::from_secs(60), std::future::pending())
        .await
    {
        Ok(dev2) => {
            let f = OpenOptions::new()
                .read(true)
                .open(dev2.path())
                .expect("open resumed device");
            let mut back = vec![0u8; 4096];
            f.read_exact_at(&mut back, offset)
                .expect("read resumed device");
            r.check(
                "resume-reads-paused-write",
                if back == block {
                    Ok(())
                } else {
                    Err("data differs".into())
                },
            );
            drop(f);
            r.check("close-resumed", q.close().await.map_err(|e| e.to_string()));
        }
        Err(e) => r.check("resume-attach", Err(e.to_string())),
    }

    // Drop without close must still disconnect and release.
    let mut d = provider(
        BaseImage::Template(TemplatePath::new(template)),
        work,
        "kvm-drop",
    );
    d.start().expect("start");
    if let Ok(dev3) = d
        .path(Duration::from_secs(60), std::future::pending())
        .await
    {
        let p3 = dev3.path().to_owned();
        drop(d);
        // The drop disconnects at once; the kernel's teardown finishes shortly after.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = slot_quiescent(&p3);
        while last.is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = slot_quiescent(&p3);
        }
        r.check("drop-releases-slot", last);
    } else {
        r.check("drop-attach", Err("attach failed".into()));
    }

    r.check(
        "template-unchanged",
        if sha(template) == before {
            Ok(())
        } else {
            Err("sha256 changed".into())
        },
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: kernel_vm TEMPLATE WORKDIR");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut r = Report { pass: 0, fail: 0 };
    rt.block_on(run(Path::new(&args[1]), Path::new(&args[2]), &mut r));
    println!("RESULT pass={} fail={}", r.pass, r.fail);
    std::process::exit(if r.fail == 0 && r.pass > 0 { 0 } else { 1 });
}
