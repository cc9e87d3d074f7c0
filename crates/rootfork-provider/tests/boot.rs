//! Real boots: QEMU (TCG by default) with Debian's cloud kernel, each VM's root disk a rootfork
//! socket-provider overlay of one shared ext4 template, served by rootfork's own NBD server.
//!
//! Ignored by default (it needs QEMU, the kernel and the guest assets); `scripts/test.d/50-boot.sh`
//! prepares them and runs `cargo test -p rootfork-provider --test boot -- --ignored`.
//!
//! Environment: `QEMU`, `QEMU_MODULE_DIR`, `KERNEL` (from `tests/vm/assets.sh`),
//! `ROOTFORK_BOOT_ASSETS` (the directory `tests/boot/build-assets.sh` wrote),
//! `ROOTFORK_BOOT_VMS` (VMs booted at once, default 3), `ROOTFORK_QEMU_ACCEL` (tcg|kvm|auto).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{never, sha256, WriteWatch};
use rootfork_block::{OverlayOptions, TemplatePath};
use rootfork_provider::{
    BaseImage, DirectProvider, PausedDisk, Provider, SocketConfig, SocketProvider,
};
use rootfork_vmm::firecracker::{TemplateIdentity, VerifyError};
use rootfork_vmm::qemu::{
    Accel, AccelPolicy, NbdEndpoint, QemuBinary, QemuConfig, QemuError, QemuProcess, RootDisk,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

struct Env {
    qemu: QemuBinary,
    kernel: PathBuf,
    initrd: PathBuf,
    template: PathBuf,
    accel: Accel,
    vms: usize,
    /// What QEMU must never hold open.
    templates: Vec<TemplateIdentity>,
}

fn env() -> Env {
    let need = |k: &str| -> PathBuf {
        std::env::var_os(k)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{k} is not set: run scripts/test.d/50-boot.sh"))
    };
    let assets = need("ROOTFORK_BOOT_ASSETS");
    let qemu = QemuBinary::from_env();
    let kernel = need("KERNEL");
    let policy = AccelPolicy::from_env().expect("ROOTFORK_QEMU_ACCEL");
    let accel = policy.resolve(&qemu, &kernel, Duration::from_secs(20));
    let vms = std::env::var("ROOTFORK_BOOT_VMS")
        .ok()
        .map(|v| v.parse().expect("ROOTFORK_BOOT_VMS must be a number"))
        .unwrap_or(3);
    Env {
        qemu,
        kernel,
        initrd: assets.join("initrd.cpio.gz"),
        template: assets.join("template.ext4"),
        accel,
        vms,
        templates: vec![
            TemplateIdentity::of(&TemplatePath::new(assets.join("template.ext4")))
                .expect("template.ext4"),
        ],
    }
}

/// One finished boot.
struct Boot {
    vmid: String,
    console: String,
    /// Spawn to QEMU exit (the guest powers itself off right after its marker).
    elapsed: Duration,
}

/// Boots a VM whose root disk is `ep` and waits for it to power off.
async fn boot(env: &Env, dir: &Path, vmid: &str, ep: NbdEndpoint) -> Boot {
    boot_disk(env, dir, vmid, RootDisk::Nbd(ep)).await
}

/// The QEMU config of VM `vmid` with root disk `root`.
fn vm_config(env: &Env, dir: &Path, vmid: &str, root: RootDisk) -> QemuConfig {
    let mut cfg = QemuConfig::new(&env.kernel, root, dir.join(format!("{vmid}.console")));
    cfg.accel = env.accel;
    cfg.initrd = Some(env.initrd.clone());
    cfg.append = format!("console=ttyS0 root=/dev/vda rw panic=-1 quiet rootfork.vmid={vmid}");
    cfg
}

/// Starts QEMU paused, verifies what it opened against `templates`, then lets the guest run.
fn start_vm(
    env: &Env,
    dir: &Path,
    vmid: &str,
    cfg: &QemuConfig,
    templates: &[TemplateIdentity],
) -> Result<QemuProcess, QemuError> {
    QemuProcess::spawn_verified(
        &env.qemu,
        cfg,
        &dir.join(format!("{vmid}.qemu.log")),
        &dir.join(format!("{vmid}.qmp")),
        templates,
    )
}

/// Boots a VM on `root` and waits for it to power off.
async fn boot_disk(env: &Env, dir: &Path, vmid: &str, root: RootDisk) -> Boot {
    let cfg = vm_config(env, dir, vmid, root);
    let mut vm = tokio::task::block_in_place(|| start_vm(env, dir, vmid, &cfg, &env.templates))
        .expect("starting qemu");
    let exit = vm.wait_timeout_async(BOOT_TIMEOUT).await;
    let console = vm.console();
    let exit = exit.unwrap_or_else(|e| {
        panic!(
            "{vmid}: {e}\n--- console ---\n{console}\n--- qemu ---\n{}",
            vm.log()
        )
    });
    assert!(
        exit.status.is_some_and(|s| s.success()),
        "{vmid}: qemu exited with {exit}\n{}\n{console}",
        vm.log()
    );
    Boot {
        vmid: vmid.to_owned(),
        console,
        elapsed: exit.elapsed,
    }
}

/// The hello files the guest listed in its marker line.
fn marker_files(b: &Boot) -> Vec<String> {
    let line = b
        .console
        .lines()
        .find(|l| l.contains(&format!("ROOTFORK-BOOT-OK vmid={} ", b.vmid)))
        .unwrap_or_else(|| panic!("{}: no marker on the console:\n{}", b.vmid, b.console));
    let files = line
        .split("files=[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or("");
    let mut v: Vec<String> = files.split_whitespace().map(str::to_owned).collect();
    v.sort();
    v
}

/// Copies the whole export to a file with `nbdcopy` and lists its root directory with `debugfs`.
fn root_listing_via_nbd(ep: &NbdEndpoint, raw: &Path) -> String {
    let _ = std::fs::remove_file(raw);
    let st = Command::new("nbdcopy")
        .arg(ep.uri())
        .arg(raw)
        .status()
        .expect("nbdcopy (libnbd-bin)");
    assert!(st.success(), "nbdcopy {ep} failed");
    let listing = root_listing(raw);
    std::fs::remove_file(raw).unwrap();
    listing
}

/// Lists the root directory of the ext4 image `image` with `debugfs`.
fn root_listing(image: &Path) -> String {
    let out = Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(image)
        .output()
        .expect("debugfs");
    assert!(
        out.status.success(),
        "debugfs failed on {}",
        image.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn socket_config(dir: &Path, base: BaseImage, name: &str) -> SocketConfig {
    SocketConfig {
        base,
        socket: dir.join(format!("{name}.sock")),
        export: name.to_owned(),
        cache: dir.join(format!("{name}.cache")),
        overlay: OverlayOptions::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, a kernel and guest assets: run scripts/test.d/50-boot.sh"]
async fn vms_boot_from_one_template_in_isolation_and_resume_after_pause() {
    let env = env();
    assert!(env.vms >= 1);
    let dir = tempfile::tempdir().unwrap();
    let before = sha256(&env.template);
    let watch = WriteWatch::new(&env.template);
    let template = TemplatePath::new(&env.template);
    eprintln!("accelerator: {:?}, VMs at once: {}", env.accel, env.vms);

    // --- Cold boots, all at once, one overlay each.
    let names: Vec<String> = (0..env.vms).map(|i| format!("vm{i}")).collect();
    let mut providers = Vec::new();
    let t_attach = Instant::now();
    for n in &names {
        let mut p = SocketProvider::new(socket_config(
            dir.path(),
            BaseImage::Template(template.clone()),
            n,
        ));
        p.start().unwrap();
        providers.push(p);
    }
    let mut endpoints = Vec::new();
    for p in &providers {
        endpoints.push(p.path(Duration::from_secs(30), never()).await.unwrap());
    }
    let attach = t_attach.elapsed();
    let t_boot = Instant::now();
    let boots = {
        let env = &env;
        let futs = names
            .iter()
            .zip(&endpoints)
            .map(|(n, ep)| boot(env, dir.path(), n, ep.clone()));
        join_all(futs).await
    };
    let wall = t_boot.elapsed();

    for (b, ep) in boots.iter().zip(&endpoints) {
        assert_eq!(
            marker_files(b),
            vec![format!("hello-{}", b.vmid)],
            "{}: guest saw other files",
            b.vmid
        );
        let listing = root_listing_via_nbd(ep, &dir.path().join(format!("{}.raw", b.vmid)));
        for other in &names {
            let present = listing.contains(&format!("hello-{other}"));
            assert_eq!(
                present,
                *other == b.vmid,
                "{}'s overlay: hello-{other} present={present}\n{listing}",
                b.vmid
            );
        }
    }
    assert_eq!(
        sha256(&env.template),
        before,
        "template modified by the cold boots"
    );

    // --- Pause vm0: export its diff; close every provider.
    let data = dir.path().join("vm0.diff");
    let paused: PausedDisk = providers[0].export_diff(&data).await.unwrap();
    let diff_bytes = paused.map.data_len();
    for p in &mut providers {
        p.close().await.unwrap();
    }
    for n in &names {
        assert!(
            !dir.path().join(format!("{n}.cache")).exists(),
            "{n}: overlay cache left behind"
        );
        assert!(
            !dir.path().join(format!("{n}.sock")).exists(),
            "{n}: socket left behind"
        );
    }

    // --- Resume vm0 on a new overlay over template + diff, boot again.
    let base = BaseImage::Resumed {
        template: template.clone(),
        paused,
    };
    let mut resumed = SocketProvider::new(socket_config(dir.path(), base, "vm0-resumed"));
    resumed.start().unwrap();
    let ep = resumed
        .path(Duration::from_secs(30), never())
        .await
        .unwrap();
    let again = boot(&env, dir.path(), "vm0-resumed", ep.clone()).await;
    assert_eq!(
        marker_files(&again),
        vec!["hello-vm0".to_string(), "hello-vm0-resumed".to_string()]
    );
    assert!(
        again
            .console
            .contains("ROOTFORK-FILE /hello-vm0: written by vm0"),
        "the resumed guest does not see what it wrote before the pause:\n{}",
        again.console
    );
    let listing = root_listing_via_nbd(&ep, &dir.path().join("resumed.raw"));
    assert!(listing.contains("hello-vm0-resumed") && !listing.contains("hello-vm1"));
    resumed.close().await.unwrap();

    // --- Peer comparison, one VM at a time in this same run: rootfork's socket provider vs
    // nbdkit's cow filter over the same template, in ABBA order so a drift in the host's load
    // (other builds on the machine) hits both sides alike.
    let mut solo_total = Duration::ZERO;
    let mut peer_total = Duration::ZERO;
    for (round, ours) in [true, false, false, true].into_iter().enumerate() {
        let name = format!("{}{round}", if ours { "solo" } else { "peer" });
        let b = if ours {
            let mut p = SocketProvider::new(socket_config(
                dir.path(),
                BaseImage::Template(template.clone()),
                &name,
            ));
            p.start().unwrap();
            let ep = p.path(Duration::from_secs(30), never()).await.unwrap();
            let b = boot(&env, dir.path(), &name, ep).await;
            p.close().await.unwrap();
            b
        } else {
            let sock = dir.path().join(format!("{name}.sock"));
            let _nbdkit = Nbdkit::start(&env.template, &sock);
            boot(
                &env,
                dir.path(),
                &name,
                NbdEndpoint::new(&sock, "").unwrap(),
            )
            .await
        };
        assert_eq!(marker_files(&b), vec![format!("hello-{name}")]);
        *(if ours {
            &mut solo_total
        } else {
            &mut peer_total
        }) += b.elapsed;
    }

    // --- The direct provider (building templates): a full copy, booted as a plain file.
    let copy = dir.path().join("direct.ext4");
    let mut direct = DirectProvider::new(template.clone(), &copy);
    direct.start().unwrap();
    let dev = direct.path(Duration::from_secs(60), never()).await.unwrap();
    // The run-time guard with a real QEMU: declare the copy a template, and QEMU (which must
    // open it as its root disk) is refused and killed before the guest runs a single instruction.
    {
        let as_template = [TemplateIdentity::of(&TemplatePath::new(&copy)).unwrap()];
        let cfg = vm_config(&env, dir.path(), "refused", RootDisk::Device(dev.clone()));
        let r = tokio::task::block_in_place(|| {
            start_vm(&env, dir.path(), "refused", &cfg, &as_template)
        });
        assert!(
            matches!(
                r,
                Err(QemuError::Verify(VerifyError::TemplateOpened { .. }))
            ),
            "QEMU holding a template was not refused: {r:?}"
        );
        let console = std::fs::read(dir.path().join("refused.console")).unwrap();
        assert!(console.is_empty(), "the refused guest ran");
    }
    let direct_boot = boot_disk(&env, dir.path(), "direct", RootDisk::Device(dev)).await;
    assert_eq!(marker_files(&direct_boot), vec!["hello-direct".to_string()]);
    direct.close().await.unwrap();
    let listing = root_listing(&copy);
    assert!(
        listing.contains("hello-direct"),
        "the direct copy lacks the guest's file:\n{listing}"
    );

    assert_eq!(sha256(&env.template), before, "template modified");
    assert_eq!(
        watch.events().0,
        0,
        "the template was opened writable or modified"
    );

    eprintln!(
        "boot times ({:?}, q35, 256 MiB, 1 vCPU; spawn -> guest power-off):",
        env.accel
    );
    eprintln!("  attach of {} socket providers: {attach:?}", env.vms);
    for b in &boots {
        eprintln!("  {:<12} {:>7.2} s", b.vmid, b.elapsed.as_secs_f64());
    }
    eprintln!(
        "  {} VMs at once: wall {:.2} s",
        env.vms,
        wall.as_secs_f64()
    );
    eprintln!(
        "  {:<12} {:>7.2} s (resumed; diff {} KiB)",
        again.vmid,
        again.elapsed.as_secs_f64(),
        diff_bytes / 1024
    );
    eprintln!(
        "  one VM alone, mean of 2 (ABBA): rootfork socket provider {:.2} s, nbdkit cow filter {:.2} s (ratio {:.2})",
        solo_total.as_secs_f64() / 2.0,
        peer_total.as_secs_f64() / 2.0,
        solo_total.as_secs_f64() / peer_total.as_secs_f64()
    );
    eprintln!(
        "  {:<12} {:>7.2} s (direct provider: full copy by {:?}, booted as a file)",
        direct_boot.vmid,
        direct_boot.elapsed.as_secs_f64(),
        direct.copy_method()
    );
}

/// nbdkit with its cow filter over the template, in the foreground, killed and reaped on drop:
/// the peer the boot times are compared with.
struct Nbdkit(std::process::Child);

impl Nbdkit {
    fn start(template: &Path, socket: &Path) -> Nbdkit {
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(socket)
            .args(["--filter=cow", "file"])
            .arg(template)
            .spawn()
            .expect("nbdkit (Debian package nbdkit) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "nbdkit did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Nbdkit(child)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs futures concurrently on this task and returns their outputs in order.
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}
