//! A fake kernel for the daemon's kernel provider: a sysfs tree, netlink control and device
//! nodes (regular files) in a tempdir, injected with the `Config::seams.kernel_backend` test
//! seam. It keeps its ends of each device's socketpairs, so a test can speak the kernel's NBD
//! dialect on them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rootfork::daemon::kernel::KernelBackend;
use rootfork_kernel::netlink::{ConnectRequest, DeviceStatus, NlError, ReconfigureRequest};
use rootfork_kernel::{DeviceNodes, NbdControl};

/// Device slots of the fake kernel.
pub const SLOTS: u32 = 4;

/// The fake kernel: a sysfs tree, and the netlink calls keeping their ends of the sockets.
pub struct FakeKernel {
    pub sys: PathBuf,
    pub sockets: Mutex<BTreeMap<u32, Vec<OwnedFd>>>,
    /// `dead_conn_timeout_secs` of the last connect.
    pub dead_conn_timeout: Mutex<Option<Option<u64>>>,
    pub refuse_reconfigure: AtomicBool,
    pub reconfigured: AtomicUsize,
    /// When set, the next connect waits for a message on it (at most 30 s): an attach held
    /// in the kernel.
    pub hold_connect: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl FakeKernel {
    pub fn slot(&self, i: u32) -> PathBuf {
        self.sys.join(format!("block/nbd{i}"))
    }

    /// A clone of the kernel's end of the first socket of device `i`.
    pub fn socket(&self, i: u32) -> UnixStream {
        let fd = self.sockets.lock().unwrap()[&i][0].try_clone().unwrap();
        UnixStream::from(fd)
    }

    /// Kills the first connection of device `i` as a dead peer would: the kernel's end is shut
    /// down and dropped, so the daemon's dispatcher for it finishes.
    pub fn kill_connection(&self, i: u32) {
        let fd = self.sockets.lock().unwrap().get_mut(&i).unwrap().remove(0);
        nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
    }

    pub fn quiescent(&self, i: u32) -> bool {
        let d = self.slot(i);
        !d.join("pid").exists() && std::fs::read_to_string(d.join("size")).unwrap().trim() == "0"
    }
}

/// Our own references to the sockets a connect or reconfigure hands over.
fn take_refs(fds: &[i32]) -> Vec<OwnedFd> {
    fds.iter()
        .map(|&fd| {
            // SAFETY: the caller keeps the socket open for the duration of the request; we take
            // our own reference like the kernel does.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            b.try_clone_to_owned().unwrap()
        })
        .collect()
}

impl NbdControl for FakeKernel {
    fn connect(&self, req: &ConnectRequest) -> Result<u32, NlError> {
        let hold = self.hold_connect.lock().unwrap().take();
        if let Some(rx) = hold {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(30));
        }
        let i = req.index.expect("rootfork names the slot");
        let refs = take_refs(&req.sockets);
        let d = self.slot(i);
        std::fs::write(d.join("pid"), format!("{}\n", std::process::id())).unwrap();
        std::fs::write(d.join("size"), format!("{}\n", req.size_bytes / 512)).unwrap();
        if let Some(b) = &req.backend_identifier {
            std::fs::write(d.join("backend"), format!("{b}\n")).unwrap();
        }
        *self.dead_conn_timeout.lock().unwrap() = Some(req.dead_conn_timeout_secs);
        self.sockets.lock().unwrap().insert(i, refs);
        Ok(i)
    }

    fn disconnect(&self, i: u32) -> Result<(), NlError> {
        let Some(refs) = self.sockets.lock().unwrap().remove(&i) else {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        };
        for r in &refs {
            let _ = nix::sys::socket::shutdown(r.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let d = self.slot(i);
        let _ = std::fs::remove_file(d.join("pid"));
        let _ = std::fs::remove_file(d.join("backend"));
        std::fs::write(d.join("size"), "0\n").unwrap();
        Ok(())
    }

    fn reconfigure(&self, req: &ReconfigureRequest) -> Result<(), NlError> {
        if self.refuse_reconfigure.load(Ordering::SeqCst) {
            return Err(NlError::Refused {
                errno: libc::EOPNOTSUPP,
            });
        }
        let mut all = self.sockets.lock().unwrap();
        let Some(refs) = all.get_mut(&req.index) else {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        };
        refs.extend(take_refs(&req.sockets));
        self.reconfigured
            .fetch_add(req.sockets.len(), Ordering::SeqCst);
        Ok(())
    }

    fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
        Ok(vec![])
    }
}

/// Device nodes: regular files in a directory.
pub struct FakeNodes {
    dir: PathBuf,
}

impl DeviceNodes for FakeNodes {
    fn open(&self, i: u32) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("nbd{i}")))
    }

    fn flush(&self, f: &std::fs::File) -> std::io::Result<()> {
        f.sync_all()
    }
}

/// A fake kernel under `root`, and the backend that points the daemon at it.
pub fn fake_kernel(root: &Path) -> (Arc<FakeKernel>, KernelBackend) {
    let sys = root.join("sys");
    std::fs::create_dir_all(sys.join("module/nbd/parameters")).unwrap();
    std::fs::write(
        sys.join("module/nbd/parameters/nbds_max"),
        format!("{SLOTS}\n"),
    )
    .unwrap();
    for i in 0..SLOTS {
        let d = sys.join(format!("block/nbd{i}"));
        std::fs::create_dir_all(d.join("holders")).unwrap();
        std::fs::write(d.join("size"), "0\n").unwrap();
        std::fs::write(d.join("inflight"), "       0        0\n").unwrap();
    }
    let nodes = root.join("nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    let kernel = Arc::new(FakeKernel {
        sys: sys.clone(),
        sockets: Mutex::new(BTreeMap::new()),
        dead_conn_timeout: Mutex::new(None),
        refuse_reconfigure: AtomicBool::new(false),
        reconfigured: AtomicUsize::new(0),
        hold_connect: Mutex::new(None),
    });
    let node_dir = nodes.clone();
    let backend = KernelBackend {
        sysfs_root: sys,
        control: kernel.clone(),
        nodes: Arc::new(FakeNodes { dir: nodes }),
        node_path: Arc::new(move |i| node_dir.join(format!("nbd{i}"))),
    };
    (kernel, backend)
}

/// One request in the kernel's NBD dialect (simple replies); returns (error, read payload).
pub fn nbd_request(
    s: &mut UnixStream,
    cmd: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
    read_len: u32,
) -> (u32, Vec<u8>) {
    let len = if cmd == 1 {
        data.len() as u32
    } else {
        read_len
    };
    let mut req = Vec::with_capacity(28 + data.len());
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&cmd.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(data);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[0..4].try_into().unwrap()),
        0x6744_6698
    );
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), cookie);
    let err = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    let n = if cmd == 0 && err == 0 {
        read_len as usize
    } else {
        0
    };
    let mut payload = vec![0u8; n];
    s.read_exact(&mut payload).unwrap();
    (err, payload)
}
