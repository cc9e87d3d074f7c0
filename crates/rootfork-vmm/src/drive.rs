//! The path types a root drive passes through on its way to the VMM.
//!
//! The reference system configured Firecracker with the template's path instead of the
//! sandbox's `/dev/nbdN`, so every VM booted from (and wrote into) the shared template. Here each
//! kind of path has its own type and only one road leads to a drive configuration:
//!
//! ```text
//! provider ──▶ DevicePath ──verify (stat)──▶ ReadyDevice ─┐
//!                                                        ├──▶ RootDrive ──▶ PUT /drives/rootfs
//! launcher ──▶ StableDrivePath (/fc-vm/rootfs.ext4) ─────┘
//! ```
//!
//! * [`DevicePath`] is what a provider says its device is called (`/dev/nbd3`, or the
//!   per-sandbox file the direct provider made).
//! * [`ReadyDevice`] can only be made by [`ReadyDevice::verify`], which stats a `DevicePath` and
//!   records its identity. Providers return it from `path()` once the device is ready.
//! * [`StableDrivePath`] is the path the VMM is given; it resolves to the ready device through
//!   the per-instance link (see [`crate::firecracker::HostLink`]).
//! * [`RootDrive`] is the root drive configuration, and [`RootDrive::new`] takes a
//!   `&ReadyDevice` and a `StableDrivePath`, nothing else.
//!
//! The template's path type, `rootfork_block::TemplatePath`, converts into none of these, so
//! handing the template to the VMM does not compile:
//!
//! ```compile_fail,E0308
//! fn reference_bug(
//!     template: &rootfork_block::TemplatePath,
//!     stable: rootfork_vmm::StableDrivePath,
//! ) -> rootfork_vmm::RootDrive {
//!     rootfork_vmm::RootDrive::new(template, stable)
//! }
//! ```
//!
//! Neither does a bare path:
//!
//! ```compile_fail,E0308
//! fn reference_bug(stable: rootfork_vmm::StableDrivePath) -> rootfork_vmm::RootDrive {
//!     let cache = std::path::PathBuf::from("/var/lib/rootfork/templates/base/cache");
//!     rootfork_vmm::RootDrive::new(&cache, stable)
//! }
//! ```
//!
//! The same function with the ready device in the template's place compiles. (Stable rustdoc
//! does not check the error code of a `compile_fail` example, so this twin pins down that the
//! only thing wrong above is the argument's type.)
//!
//! ```
//! fn configure(
//!     template: &rootfork_block::TemplatePath,
//!     device: &rootfork_vmm::ReadyDevice,
//!     stable: rootfork_vmm::StableDrivePath,
//! ) -> rootfork_vmm::RootDrive {
//!     let _ = template.as_path();
//!     let _cache = std::path::PathBuf::from("/var/lib/rootfork/templates/base/cache");
//!     rootfork_vmm::RootDrive::new(device, stable)
//! }
//! ```
//!
//! The second guard is at run time: after the drive is configured, the files the VMM process
//! actually holds open are compared with the device and the template
//! (see [`crate::firecracker::verify_opened`]).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::attachment::block_attachment;
use crate::identity::{FileIdentity, FileKind};

/// Errors building drive path types.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The device path could not be stat'ed.
    #[error("device {path} cannot be stat'ed: {source}")]
    Stat {
        /// The provider's device path.
        path: PathBuf,
        /// The `stat` error.
        #[source]
        source: std::io::Error,
    },
    /// The device path names something that cannot back a drive.
    #[error("device {path} is a {kind}, not a block device or regular file")]
    UnsupportedKind {
        /// The provider's device path.
        path: PathBuf,
        /// What it turned out to be.
        kind: FileKind,
    },
    /// The device path no longer names the device that was verified.
    #[error("device {path} changed: verified as {expected}, now {found}")]
    Changed {
        /// The provider's device path.
        path: PathBuf,
        /// The identity recorded at verification.
        expected: FileIdentity,
        /// What the path names now.
        found: FileIdentity,
    },
    /// The device node names the same slot but another attachment (its backend identifier
    /// changed: the slot was released and connected again).
    #[error("device {path} was attached again: verified as {expected:?}, now {found:?}")]
    Reattached {
        /// The provider's device path.
        path: PathBuf,
        /// The backend identifier recorded at verification.
        expected: Option<String>,
        /// The backend identifier now.
        found: Option<String>,
    },
    /// A stable drive path is malformed.
    #[error("invalid stable drive path {path}: {reason}")]
    InvalidStablePath {
        /// The rejected path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
}

/// The path of a provider's device, as the provider names it (`/dev/nbd3`, or a per-sandbox file
/// made by the direct provider). Not yet known to exist: verify it into a [`ReadyDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DevicePath(PathBuf);

impl DevicePath {
    /// Wraps the path of a provider's device. Only providers call this.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DevicePath(path.into())
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// A provider's device that has been verified to exist, with its identity recorded.
///
/// The only constructor is [`ReadyDevice::verify`]; there is deliberately no `From` impl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyDevice {
    path: DevicePath,
    identity: FileIdentity,
    /// For a block device, its backend identifier at verification (see `attachment.rs`).
    attachment: Option<String>,
}

impl ReadyDevice {
    /// Stats `path` (following symlinks) and records what it is. Block devices (`/dev/nbdN`) and
    /// regular files (the direct provider) are accepted; character devices, directories and
    /// sockets cannot back a drive and are refused.
    pub fn verify(path: DevicePath) -> Result<Self, DriveError> {
        let identity = FileIdentity::of(path.as_path()).map_err(|source| DriveError::Stat {
            path: path.0.clone(),
            source,
        })?;
        let attachment = match identity.kind {
            FileKind::Block => {
                block_attachment(identity.rdev).map_err(|source| DriveError::Stat {
                    path: path.0.clone(),
                    source,
                })?
            }
            FileKind::Regular => None,
            kind => return Err(DriveError::UnsupportedKind { path: path.0, kind }),
        };
        Ok(ReadyDevice {
            path,
            identity,
            attachment,
        })
    }

    /// For a block device, the backend identifier it had at verification: which attachment of
    /// the slot this is.
    pub fn attachment(&self) -> Option<&str> {
        self.attachment.as_deref()
    }

    /// Fails if the verified block device now belongs to another attachment (same slot, another
    /// backend identifier).
    pub fn check_attachment(&self) -> Result<(), DriveError> {
        if !self.is_block() {
            return Ok(());
        }
        let found = block_attachment(self.identity.rdev).map_err(|source| DriveError::Stat {
            path: self.path.0.clone(),
            source,
        })?;
        if found == self.attachment {
            Ok(())
        } else {
            Err(DriveError::Reattached {
                path: self.path.0.clone(),
                expected: self.attachment.clone(),
                found,
            })
        }
    }

    /// The device's path as the provider named it.
    pub fn path(&self) -> &Path {
        self.path.as_path()
    }

    /// The device path value.
    pub fn device_path(&self) -> &DevicePath {
        &self.path
    }

    /// The identity recorded at verification.
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }

    /// Whether this is a block device (matched by `st_rdev`) rather than a file (matched by inode).
    pub fn is_block(&self) -> bool {
        self.identity.kind == FileKind::Block
    }

    /// Stats the path again and fails if it no longer names the verified device: another device
    /// number, or the same `/dev/nbdN` slot released and attached again (its backend identifier
    /// changed).
    pub fn recheck(&self) -> Result<(), DriveError> {
        let found = FileIdentity::of(self.path()).map_err(|source| DriveError::Stat {
            path: self.path.0.clone(),
            source,
        })?;
        if found.same_disk(&self.identity) && found.kind == self.identity.kind {
            self.check_attachment()
        } else {
            Err(DriveError::Changed {
                path: self.path.0.clone(),
                expected: self.identity,
                found,
            })
        }
    }
}

/// The drive path the VMM is given (e.g. `/fc-vm/rootfs.ext4`): the same for every VM and across
/// pause and resume, resolving to the current device through a per-instance link.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StableDrivePath(PathBuf);

impl StableDrivePath {
    /// An absolute, normalised path (no `.`/`..`) with a parent directory and a file name.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, DriveError> {
        let path = path.into();
        let bad = |reason| DriveError::InvalidStablePath {
            path: path.clone(),
            reason,
        };
        if !path.is_absolute() {
            return Err(bad("not absolute"));
        }
        if path
            .components()
            .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
        {
            return Err(bad("contains . or .."));
        }
        if path.file_name().is_none() || !matches!(path.parent(), Some(p) if p != Path::new("")) {
            return Err(bad("needs a directory and a file name"));
        }
        Ok(StableDrivePath(path))
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The directory holding the drive path (the tmpfs mounted in the VMM's namespace).
    pub fn dir(&self) -> &Path {
        self.0.parent().expect("checked in new")
    }

    /// The drive's file name inside [`StableDrivePath::dir`].
    pub fn file_name(&self) -> &std::ffi::OsStr {
        self.0.file_name().expect("checked in new")
    }

    /// The path as the API wants it.
    pub fn to_api_string(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl fmt::Display for StableDrivePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// How the guest may use the root drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriveAccess {
    /// Read-write (the normal case: the overlay takes the writes).
    #[default]
    ReadWrite,
    /// Read-only.
    ReadOnly,
}

/// The root drive configuration: a verified device behind a stable path.
///
/// Built only by [`RootDrive::new`] from a [`ReadyDevice`], so it cannot name a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDrive {
    device: ReadyDevice,
    stable: StableDrivePath,
    access: DriveAccess,
}

impl RootDrive {
    /// Drive id used for the root drive in API calls.
    pub const DRIVE_ID: &'static str = "rootfs";

    /// The root drive for `device`, given to the VMM as `stable`.
    pub fn new(device: &ReadyDevice, stable: StableDrivePath) -> Self {
        RootDrive {
            device: device.clone(),
            stable,
            access: DriveAccess::ReadWrite,
        }
    }

    /// Sets the access mode.
    pub fn with_access(mut self, access: DriveAccess) -> Self {
        self.access = access;
        self
    }

    /// The device the stable path must resolve to.
    pub fn device(&self) -> &ReadyDevice {
        &self.device
    }

    /// The path the VMM is given.
    pub fn stable_path(&self) -> &StableDrivePath {
        &self.stable
    }

    /// The access mode.
    pub fn access(&self) -> DriveAccess {
        self.access
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_records_identity_and_refuses_non_disks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let ready = ReadyDevice::verify(DevicePath::new(&f)).unwrap();
        assert_eq!(ready.identity().kind, FileKind::Regular);
        assert!(!ready.is_block());
        ready.recheck().unwrap();

        assert!(matches!(
            ReadyDevice::verify(DevicePath::new(dir.path())),
            Err(DriveError::UnsupportedKind {
                kind: FileKind::Directory,
                ..
            })
        ));
        assert!(matches!(
            ReadyDevice::verify(DevicePath::new("/dev/null")),
            Err(DriveError::UnsupportedKind {
                kind: FileKind::Char,
                ..
            })
        ));
        assert!(matches!(
            ReadyDevice::verify(DevicePath::new(dir.path().join("missing"))),
            Err(DriveError::Stat { .. })
        ));
    }

    #[test]
    fn recheck_notices_a_replaced_device() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk");
        std::fs::write(&f, b"a").unwrap();
        let ready = ReadyDevice::verify(DevicePath::new(&f)).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"b").unwrap();
        std::fs::rename(&other, &f).unwrap();
        assert!(matches!(ready.recheck(), Err(DriveError::Changed { .. })));
    }

    #[test]
    fn stable_paths_are_absolute_and_normalised() {
        let p = StableDrivePath::new("/fc-vm/rootfs.ext4").unwrap();
        assert_eq!(p.dir(), Path::new("/fc-vm"));
        assert_eq!(p.file_name(), "rootfs.ext4");
        assert!(StableDrivePath::new("fc-vm/rootfs.ext4").is_err());
        assert!(StableDrivePath::new("/fc-vm/../etc/passwd").is_err());
        assert!(StableDrivePath::new("/").is_err());
    }
}
