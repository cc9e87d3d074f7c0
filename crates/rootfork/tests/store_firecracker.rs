//! A Firecracker sandbox paused with its VM's memory on one host and restored on another through
//! the object store: two in-process daemons (each with its fake kernel's device nodes as
//! `/dev/nbdN` and the API double as Firecracker) sharing one `file://` store. The pause's
//! snapshot (state + memory files) is uploaded with its layer; the other host downloads it into
//! its own pause directory, byte for byte, and a new Firecracker process loads it onto that
//! host's device and resumes. The holder's delete removes the snapshot from the store.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fake_kernel::{fake_kernel, FakeKernel};
use common::*;
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::remote::StoreUrl;

/// A daemon with a fake kernel under `root`, the Firecracker double and the store `store`.
async fn host(root: &Path, store: &Path) -> (TestDaemon, Arc<FakeKernel>) {
    let double = rootfork_fc_double::binary_path().expect("building the Firecracker double");
    let (kernel, backend) = fake_kernel(root);
    let store = store.to_owned();
    let d = TestDaemon::start_with(false, move |c: &mut Config| {
        c.seams.kernel_backend = Some(backend);
        c.firecracker_bin = double;
        c.store_url = Some(StoreUrl::Dir(store));
        c.health_interval = Duration::from_secs(3600);
    })
    .await;
    (d, kernel)
}

/// The files with extension `ext` in a state's pause directory, with their bytes.
fn snapshot_files(state: &Path, ext: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<_> = std::fs::read_dir(state.join("paused"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_firecracker_vm_paused_on_one_host_is_restored_on_another() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("store");
    let (a, _ka) = host(&shared.path().join("ka"), &store).await;
    let (b, _kb) = host(&shared.path().join("kb"), &store).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let src = make_template(shared.path(), "src.img", 16);
    import(&mut ca, "tpl", &src).await.unwrap();
    let sb = create_firecracker(&mut ca, "vm", shared.path()).await;
    assert!(sb.vm_pid > 0, "{sb:?}");
    let p = pause(&mut ca, "vm").await.unwrap();
    assert!(p.vm_state_bytes > 0, "{p:?}");
    let (state_a, mem_a) = (
        snapshot_files(&a.state(), "fcstate"),
        snapshot_files(&a.state(), "fcmem"),
    );
    assert_eq!((state_a.len(), mem_a.len()), (1, 1));
    let mut status = String::new();
    for _ in 0..600 {
        status = get(&mut ca, "vm").await.store_status;
        if status == "in the store" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "in the store");
    assert!(store.join("vmstate/vm").is_dir());

    // B resumes it: the snapshot comes down unchanged and a new Firecracker loads it.
    let r = resume(&mut cb, "vm").await.unwrap();
    assert_eq!(r.state, v1::SandboxState::Running as i32, "{}", r.message);
    assert!(r.vm_pid > 0 && r.vm_pid != sb.vm_pid, "{r:?}");
    assert_eq!(r.vm_state_bytes, 0, "the restore used the snapshot up");
    let runs: Vec<_> = std::fs::read_dir(b.state().join("vm/fc"))
        .unwrap()
        .flatten()
        .map(|e| rootfork_fc_double::read_report(&e.path().join("vmm.log")).unwrap_or_default())
        .collect();
    assert_eq!(runs.len(), 1);
    let calls: Vec<String> = runs[0]
        .iter()
        .filter(|e| e["event"] == "request")
        .map(|e| {
            format!(
                "{} {} {}",
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"]
            )
        })
        .collect();
    assert_eq!(calls, ["PUT /snapshot/load 204", "PATCH /vm 204"]);
    // (The files B restored from were A's, byte for byte: they are used up now, so compare what
    // the store held.)
    let in_store = |name: &str| -> Vec<u8> {
        let dir = std::fs::read_dir(store.join("vmstate/vm"))
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        std::fs::read(dir.join(name)).unwrap()
    };
    assert_eq!(in_store("state"), state_a[0]);
    assert_eq!(in_store("memory"), mem_a[0]);

    // A's copy is stale; B, the holder, deletes it and its snapshot leaves the store.
    let e = resume(&mut ca, "vm").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(delete(&mut cb, "vm").await.unwrap());
    let left: Vec<_> = walk(&store.join("vmstate"));
    assert!(left.is_empty(), "{left:?}");
    assert!(delete(&mut ca, "vm").await.unwrap());
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
