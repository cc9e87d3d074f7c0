//! The root disk QEMU boots from: an NBD export on a Unix socket, or a ready block device.
//!
//! A block device must come as a [`ReadyDevice`] (only a provider's verified device becomes one),
//! and [`NbdEndpoint`] is deliberately not a path: it names a socket and an export, renders as an
//! `nbd+unix://` URI and can only be turned into QEMU's `nbd` block driver, never into a `file`
//! driver that would open an image directly.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::QemuError;
use crate::ReadyDevice;

/// An NBD export served on a Unix socket (`nbd+unix:///EXPORT?socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdEndpoint {
    socket: PathBuf,
    export: String,
}

impl NbdEndpoint {
    /// An endpoint for `export` on the Unix socket at `socket`.
    ///
    /// Fails if the export name or socket path cannot be carried in a URI or on QEMU's command
    /// line (a comma, which QEMU's option parser splits on, or a control character).
    pub fn new(socket: impl Into<PathBuf>, export: impl Into<String>) -> Result<Self, QemuError> {
        let socket = socket.into();
        let export = export.into();
        let sock_str = socket.to_str().ok_or_else(|| {
            QemuError::InvalidConfig(format!("socket path {socket:?} is not UTF-8"))
        })?;
        if sock_str.is_empty() || !socket.is_absolute() {
            return Err(QemuError::InvalidConfig(format!(
                "socket path {socket:?} must be absolute"
            )));
        }
        for (what, s) in [("socket path", sock_str), ("export name", export.as_str())] {
            if s.chars().any(|c| c == ',' || c.is_control()) {
                return Err(QemuError::InvalidConfig(format!(
                    "{what} {s:?} contains a comma or control character"
                )));
            }
        }
        if export.len() > 4096 {
            return Err(QemuError::InvalidConfig(
                "export name longer than 4096 bytes".into(),
            ));
        }
        Ok(NbdEndpoint { socket, export })
    }

    /// The Unix socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The `nbd+unix://` URI (as understood by libnbd tools and QEMU).
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            percent_encode(&self.export),
            percent_encode(self.socket.to_str().unwrap_or_default())
        )
    }
}

impl fmt::Display for NbdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Percent-encodes everything outside RFC 3986's unreserved set and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What QEMU's root disk (`/dev/vda` in the guest) is backed by.
#[derive(Debug)]
pub enum RootDisk {
    /// An NBD export, opened by QEMU's own NBD client.
    Nbd(NbdEndpoint),
    /// A provider's device (`/dev/nbdN`, or the direct provider's file), verified ready.
    Device(ReadyDevice),
}

impl RootDisk {
    /// The `-blockdev` option value for node `node`.
    pub(crate) fn blockdev(&self, node: &str) -> Result<String, QemuError> {
        match self {
            RootDisk::Nbd(ep) => {
                let mut v = format!(
                    "driver=nbd,node-name={node},server.type=unix,server.path={}",
                    ep.socket().display()
                );
                if !ep.export().is_empty() {
                    v.push_str(",export=");
                    v.push_str(ep.export());
                }
                Ok(v)
            }
            RootDisk::Device(dev) => {
                let path = dev.path();
                let s = path.to_str().ok_or_else(|| {
                    QemuError::InvalidConfig(format!("device path {path:?} is not UTF-8"))
                })?;
                if s.contains(',') {
                    return Err(QemuError::InvalidConfig(format!(
                        "device path {s:?} contains a comma"
                    )));
                }
                let driver = if dev.is_block() {
                    "host_device"
                } else {
                    "file"
                };
                Ok(format!("driver={driver},node-name={node},filename={s}"))
            }
        }
    }
}
