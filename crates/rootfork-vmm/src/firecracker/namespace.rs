//! The VMM's private mount namespace, set up in the child between `fork` and `exec`.
//!
//! In the child: `unshare(CLONE_NEWNS)`, make `/` recursively a slave (host mounts still
//! propagate in, nothing propagates out), mount a small tmpfs on the stable directory (e.g.
//! `/fc-vm`) and create the stable drive path in it as a symlink to the per-instance host link.
//! Every VMM sees the same `/fc-vm/rootfs.ext4`, each resolving to its own device.
//!
//! Everything the child needs is prepared as `CString`s before the fork, so the `pre_exec` hook
//! makes only system calls (no allocation, no locks).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::drive::StableDrivePath;

/// Errors preparing the namespace plan.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(std::path::PathBuf),
    /// The stable directory cannot be `/`.
    #[error("the stable drive directory must not be /")]
    RootDir,
    /// The stable directory could not be created on the host (as an empty mount point).
    #[error("cannot create the mount point {path}: {source}")]
    MountPoint {
        /// The directory.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What the child sets up before `exec`.
#[derive(Debug, Clone)]
pub struct NamespacePlan {
    stable_dir: CString,
    stable_drive: CString,
    host_link: CString,
}

fn cstring(path: &Path) -> Result<CString, NamespaceError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| NamespaceError::Nul(path.to_owned()))
}

impl NamespacePlan {
    /// A plan making `stable` a symlink to `host_link` inside the child's namespace. Creates the
    /// stable directory on the host if it is missing (an empty directory used only as a mount
    /// point; nothing is ever written into it on the host).
    pub fn new(stable: &StableDrivePath, host_link: &Path) -> Result<Self, NamespaceError> {
        if stable.dir() == Path::new("/") {
            return Err(NamespaceError::RootDir);
        }
        std::fs::create_dir_all(stable.dir()).map_err(|source| NamespaceError::MountPoint {
            path: stable.dir().to_owned(),
            source,
        })?;
        Ok(NamespacePlan {
            stable_dir: cstring(stable.dir())?,
            stable_drive: cstring(stable.as_path())?,
            host_link: cstring(host_link)?,
        })
    }

    /// Runs in the forked child before `exec`: only system calls on prepared data.
    pub(crate) fn enter(&self) -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&CStr>,
            c"/",
            None::<&CStr>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&CStr>,
        )?;
        mount(
            Some(c"tmpfs"),
            self.stable_dir.as_c_str(),
            Some(c"tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some(c"mode=0755,size=64k"),
        )?;
        nix::unistd::symlinkat(
            self.host_link.as_c_str(),
            None,
            self.stable_drive.as_c_str(),
        )?;
        Ok(())
    }
}
