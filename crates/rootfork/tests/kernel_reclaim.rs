//! The daemon's start-up reclaim through a fake kernel (`Config::seams.kernel_backend`): it runs
//! beside the API, not before it, and it takes back the daemon instance's own orphaned device (the
//! instance id kept in the state directory names it).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::TestDaemon;
use rootfork::daemon::kernel::KernelBackend;
use rootfork_kernel::netlink::{ConnectRequest, DeviceStatus, NlError, ReconfigureRequest};
use rootfork_kernel::{DeviceNodes, NbdControl};

/// A kernel whose `DISCONNECT` waits until the test lets it through.
struct GatedKernel {
    sys: PathBuf,
    /// (a DISCONNECT is waiting, the gate is open)
    gate: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl GatedKernel {
    fn wait_for_disconnect(&self) {
        let g = self.gate.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(60), |(waiting, _)| !*waiting)
            .unwrap();
        assert!(
            !t.timed_out() && g.0,
            "the start-up reclaim never sent DISCONNECT"
        );
    }

    fn open(&self) {
        self.gate.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

impl NbdControl for GatedKernel {
    fn connect(&self, _: &ConnectRequest) -> Result<u32, NlError> {
        Err(NlError::Refused {
            errno: libc::EOPNOTSUPP,
        })
    }

    fn disconnect(&self, i: u32) -> Result<(), NlError> {
        let mut g = self.gate.lock().unwrap();
        g.0 = true;
        self.cv.notify_all();
        while !g.1 {
            g = self.cv.wait(g).unwrap();
        }
        let d = self.sys.join(format!("block/nbd{i}"));
        let _ = std::fs::remove_file(d.join("pid"));
        let _ = std::fs::remove_file(d.join("backend"));
        std::fs::write(d.join("size"), "0\n").unwrap();
        Ok(())
    }

    fn reconfigure(&self, _: &ReconfigureRequest) -> Result<(), NlError> {
        Err(NlError::Refused {
            errno: libc::EOPNOTSUPP,
        })
    }

    fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
        Ok(vec![])
    }
}

struct NoNodes;

impl DeviceNodes for NoNodes {
    fn open(&self, _: u32) -> std::io::Result<std::fs::File> {
        Err(std::io::Error::from_raw_os_error(libc::ENXIO))
    }

    fn flush(&self, _: &std::fs::File) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_reclaim_runs_beside_the_api_and_takes_back_its_own_orphan() {
    let root = tempfile::tempdir().unwrap();
    let sys = root.path().join("sys");
    std::fs::create_dir_all(sys.join("module/nbd/parameters")).unwrap();
    std::fs::write(sys.join("module/nbd/parameters/nbds_max"), "2\n").unwrap();
    for i in 0..2 {
        let d = sys.join(format!("block/nbd{i}"));
        std::fs::create_dir_all(d.join("holders")).unwrap();
        std::fs::write(d.join("size"), "0\n").unwrap();
        std::fs::write(d.join("inflight"), "0 0\n").unwrap();
    }
    // Slot 0 is still connected by this daemon instance's previous run (killed): its backend
    // identifier names the instance id kept in the state directory, and nobody holds its claim.
    let boot = rootfork_kernel::identity::boot_id().unwrap();
    let d0 = sys.join("block/nbd0");
    std::fs::write(d0.join("pid"), "4242\n").unwrap();
    std::fs::write(d0.join("size"), "2048\n").unwrap();
    std::fs::write(d0.join("backend"), format!("rootfork:{boot}:prev-run:k1\n")).unwrap();
    let kernel = Arc::new(GatedKernel {
        sys: sys.clone(),
        gate: Mutex::new((false, false)),
        cv: Condvar::new(),
    });
    let backend = KernelBackend {
        sysfs_root: sys,
        control: kernel.clone(),
        nodes: Arc::new(NoNodes),
        node_path: Arc::new(|i| PathBuf::from(format!("/nonexistent/nbd{i}"))),
    };
    let start = TestDaemon::start_prepared(
        false,
        |state| {
            std::fs::create_dir_all(state).unwrap();
            std::fs::write(state.join("nbd-instance-id"), "prev-run\n").unwrap();
        },
        |c| c.seams.kernel_backend = Some(backend),
    );
    // The start returns (and the API answers) while the reclaim's DISCONNECT is held.
    let (d, ()) = tokio::time::timeout(Duration::from_secs(60), start)
        .await
        .expect("the daemon's start waited for the start-up reclaim");
    let k = kernel.clone();
    tokio::task::spawn_blocking(move || k.wait_for_disconnect())
        .await
        .unwrap();
    let mut c = d.client().await;
    let list = c
        .devices
        .list_devices(rootfork::api::v1::ListDevicesRequest {})
        .await
        .expect("the API answers while the reclaim waits")
        .into_inner();
    assert!(!list.devices.is_empty(), "{list:?}");
    assert!(!kernel.gate.lock().unwrap().1, "the gate was opened early");
    // Let the DISCONNECT through: the orphan is reclaimed (it names this instance, so at once).
    kernel.open();
    let pool = d.daemon.core().kernel.pool().clone();
    let reclaimed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if pool.metrics().reclaimed_total == 1 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
    .await
    .unwrap();
    assert!(reclaimed, "the orphan was not reclaimed");
    assert!(!d0.join("pid").exists());
}
