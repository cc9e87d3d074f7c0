//! A sandbox with QEMU VMM settings: the daemon boots a real TCG guest on the sandbox's served
//! disk (after checking QEMU opened no template); the guest writes its own file and prints a
//! marker; the file is then read back from the sandbox's overlay, and the template is unchanged.
//!
//! Needs the boot test's assets: run through scripts/test.d/60-daemon.sh, which sets QEMU,
//! QEMU_MODULE_DIR, KERNEL (tests/vm/assets.sh) and ROOTFORK_BOOT_ASSETS (tests/boot/build-assets.sh).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use rootfork::api::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a TCG VM; run by scripts/test.d/60-daemon.sh"]
async fn daemon_boots_qemu_on_the_sandbox_disk() {
    let need =
        |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} is not set")));
    let assets = need("ROOTFORK_BOOT_ASSETS");
    let kernel = need("KERNEL");
    let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_millis(200)).await;
    let mut c = d.client().await;
    let tpl = assets.join("template.ext4");
    let before = std::fs::read(&tpl).unwrap();
    import(&mut c, "boot", &tpl).await.unwrap();
    let sb = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "boot".into(),
            id: "vm-d".into(),
            provider: v1::ProviderKind::Socket as i32,
            vmm: Some(v1::VmmSettings {
                kind: v1::vmm_settings::Kind::Qemu as i32,
                kernel: kernel.display().to_string(),
                initrd: assets.join("initrd.cpio.gz").display().to_string(),
                kernel_args: "console=ttyS0 root=/dev/vda rw panic=-1 quiet rootfork.vmid=vm-d"
                    .into(),
                memory_mib: 256,
                vcpus: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sb.vm_pid > 0);
    // A sandbox with a running VM is not paused under it (the guest needs seconds to boot).
    let p = c
        .sandboxes
        .pause_sandbox(v1::PauseSandboxRequest { id: "vm-d".into() })
        .await;
    assert_eq!(p.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let console = PathBuf::from(&sb.vm_console);
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("ROOTFORK-BOOT-OK") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        text.contains("ROOTFORK-BOOT-OK vmid=vm-d"),
        "console:\n{text}"
    );
    // The guest powers off; the health round reaps QEMU and says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = c
            .sandboxes
            .get_sandbox(v1::GetSandboxRequest { id: "vm-d".into() })
            .await
            .unwrap()
            .into_inner();
        if got.vm_pid == 0 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got.vm_pid, 0, "QEMU not reaped after the guest powered off");
    assert!(got.message.contains("VM exited"), "{}", got.message);
    assert_eq!(got.state, v1::SandboxState::Running as i32);
    // The guest's file is in the sandbox's overlay.
    let img = d.dir.path().join("disk.img");
    let st = std::process::Command::new("nbdcopy")
        .arg(&sb.nbd_uri)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let ls = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("hello-vm-d"));
    assert!(delete(&mut c, "vm-d").await.unwrap());
    assert!(
        !PathBuf::from(format!("/proc/{}", sb.vm_pid))
            .join("exe")
            .exists()
            || {
                // The pid may be reused; it must not be our QEMU any more.
                std::fs::read_link(format!("/proc/{}/exe", sb.vm_pid))
                    .map(|l| !l.to_string_lossy().contains("qemu"))
                    .unwrap_or(true)
            }
    );
    assert_eq!(std::fs::read(&tpl).unwrap(), before, "template changed");
    d.daemon.shutdown().await;
}
