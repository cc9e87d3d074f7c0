//! The run-time half of "one path, by construction": after the drive is configured, look at the
//! files the VMM process really holds open (`/proc/<pid>/fd`) and require that one of them is
//! the provider's device and none is the template.
//!
//! Device nodes are compared by `st_rdev` (the VMM may have opened `/dev/nbd3` through a
//! symlink, or a `mknod` copy inside a jail), regular files by `st_dev` + `st_ino`.

use std::fmt;
use std::path::PathBuf;

use rootfork_block::TemplatePath;

use crate::drive::ReadyDevice;
use crate::identity::FileIdentity;

/// A template image's identity, taken from its [`TemplatePath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateIdentity {
    path: PathBuf,
    identity: FileIdentity,
}

impl TemplateIdentity {
    /// Stats the template image (following symlinks).
    pub fn of(template: &TemplatePath) -> std::io::Result<Self> {
        Ok(TemplateIdentity {
            path: template.as_path().to_owned(),
            identity: FileIdentity::of(template.as_path())?,
        })
    }

    /// The template's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Its identity.
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }
}

/// One open file descriptor of the VMM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedFile {
    /// The descriptor number.
    pub fd: i32,
    /// What `/proc/<pid>/fd/<fd>` links to.
    pub target: PathBuf,
    /// Its identity (`None` for descriptors that cannot be stat'ed by path, e.g. anonymous).
    pub identity: Option<FileIdentity>,
}

impl fmt::Display for OpenedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fd {} -> {}", self.fd, self.target.display())?;
        if let Some(id) = &self.identity {
            write!(f, " ({id})")?;
        }
        Ok(())
    }
}

/// Why the VMM must not be started.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The VMM holds the device's slot, but the slot belongs to another attachment now.
    #[error(
        "the VMM (pid {pid}) holds a device that was attached again; refusing to start the VM"
    )]
    Reattached {
        /// The VMM's pid.
        pid: u32,
        /// What changed.
        #[source]
        source: crate::DriveError,
    },
    /// `/proc/<pid>/fd` could not be read.
    #[error("cannot read /proc/{pid}/fd: {source}")]
    Proc {
        /// The VMM's pid.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM opened the template.
    #[error(
        "the VMM (pid {pid}) opened the template {template}: {opened}; refusing to start the VM"
    )]
    TemplateOpened {
        /// The VMM's pid.
        pid: u32,
        /// The template path.
        template: PathBuf,
        /// The offending descriptor.
        opened: OpenedFile,
    },
    /// The VMM holds no descriptor on the provider's device.
    #[error(
        "the VMM (pid {pid}) has not opened the device {device} ({expected}); it holds: [{}]; \
         refusing to start the VM",
        .opened.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    DeviceNotOpened {
        /// The VMM's pid.
        pid: u32,
        /// The provider's device path.
        device: PathBuf,
        /// Its identity.
        expected: FileIdentity,
        /// Every file the VMM holds open.
        opened: Vec<OpenedFile>,
    },
}

/// Lists the open descriptors of `pid` with their identities (`stat` through the proc link,
/// which reaches the open file even if its path was renamed or unlinked).
pub fn opened_files(pid: u32) -> std::io::Result<Vec<OpenedFile>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A descriptor can close between readdir and readlink; skip it then.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let identity = FileIdentity::of(&entry.path()).ok();
        out.push(OpenedFile {
            fd,
            target,
            identity,
        });
    }
    out.sort_by_key(|f| f.fd);
    Ok(out)
}

/// Checks that process `pid` holds `device` open and none of `templates`; returns the
/// descriptor that holds the device.
pub fn verify_opened(
    pid: u32,
    device: &ReadyDevice,
    templates: &[TemplateIdentity],
) -> Result<OpenedFile, VerifyError> {
    let opened = opened_files(pid).map_err(|source| VerifyError::Proc { pid, source })?;
    for file in &opened {
        let Some(id) = &file.identity else { continue };
        if let Some(t) = templates.iter().find(|t| t.identity.same_disk(id)) {
            return Err(VerifyError::TemplateOpened {
                pid,
                template: t.path.clone(),
                opened: file.clone(),
            });
        }
    }
    let expected = *device.identity();
    match opened
        .iter()
        .find(|f| f.identity.is_some_and(|id| id.same_disk(&expected)))
    {
        // `st_rdev` proves the slot; the backend identifier proves it is still the attachment
        // that was verified (not the slot released and connected again).
        Some(f) => match device.check_attachment() {
            Ok(()) => Ok(f.clone()),
            Err(source) => Err(VerifyError::Reattached { pid, source }),
        },
        None => Err(VerifyError::DeviceNotOpened {
            pid,
            device: device.path().to_owned(),
            expected,
            opened,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::DevicePath;

    #[test]
    fn finds_own_open_file_and_refuses_template() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let tmpl = dir.path().join("template");
        std::fs::write(&disk, b"d").unwrap();
        std::fs::write(&tmpl, b"t").unwrap();
        let dev = ReadyDevice::verify(DevicePath::new(&disk)).unwrap();
        let t = TemplateIdentity::of(&TemplatePath::new(&tmpl)).unwrap();
        let me = std::process::id();

        // Not open yet: refused, naming what is open.
        let err = verify_opened(me, &dev, std::slice::from_ref(&t)).unwrap_err();
        assert!(matches!(err, VerifyError::DeviceNotOpened { .. }), "{err}");

        let _d = std::fs::File::open(&disk).unwrap();
        let found = verify_opened(me, &dev, std::slice::from_ref(&t)).unwrap();
        assert_eq!(found.target, disk);

        let _t = std::fs::File::open(&tmpl).unwrap();
        let err = verify_opened(me, &dev, std::slice::from_ref(&t)).unwrap_err();
        match err {
            VerifyError::TemplateOpened { opened, .. } => assert_eq!(opened.target, tmpl),
            e => panic!("unexpected {e}"),
        }
    }
}
