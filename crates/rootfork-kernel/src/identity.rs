//! Names: the one place `/dev/nbdN` is formatted, this host's id, and the backend identifier
//! (`rootfork:<hostid>:<pid>:<sandbox>`) written into `/sys/block/nbdN/backend` so that reclaim can
//! tell this host's rootfork devices from everyone else's.

use std::path::PathBuf;

/// Prefix of every backend identifier rootfork sets.
pub const BACKEND_PREFIX: &str = "rootfork";

/// The device node of slot `index`. Every path to an NBD device is formatted here.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The kernel's name of slot `index` (`nbdN`, as under `/sys/block`).
pub fn device_name(index: u32) -> String {
    format!("nbd{index}")
}

/// Parses `nbdN` into `N`.
pub fn parse_device_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// This host's id: `$ROOTFORK_HOST_ID`, else `/etc/machine-id`, else the host name, with `:` and
/// whitespace removed so it fits in a backend identifier.
pub fn host_id() -> String {
    let raw = std::env::var("ROOTFORK_HOST_ID")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/machine-id")
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "unknown".to_owned());
    sanitize(&raw)
}

fn sanitize(s: &str) -> String {
    let s: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace() && !c.is_control())
        .collect();
    if s.is_empty() {
        "unknown".to_owned()
    } else {
        s
    }
}

/// A parsed backend identifier.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendId {
    /// The host that attached the device.
    pub host: String,
    /// The attaching process.
    pub pid: u32,
    /// The sandbox (may contain `:`; it is the last field).
    pub sandbox: String,
}

impl BackendId {
    /// The identifier of a device attached now by this process.
    pub fn this_process(host: &str, sandbox: &str) -> Self {
        BackendId {
            host: sanitize(host),
            pid: std::process::id(),
            sandbox: sandbox.to_owned(),
        }
    }

    /// Parses `rootfork:<host>:<pid>:<sandbox>`; anything else is not rootfork's.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim_end_matches(['\n', '\0']).splitn(4, ':');
        if it.next()? != BACKEND_PREFIX {
            return None;
        }
        let host = it.next()?.to_owned();
        let pid = it.next()?.parse().ok()?;
        let sandbox = it.next()?.to_owned();
        if host.is_empty() {
            return None;
        }
        Some(BackendId { host, pid, sandbox })
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{BACKEND_PREFIX}:{}:{}:{}",
            self.host, self.pid, self.sandbox
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() {
        assert_eq!(device_path(7), PathBuf::from("/dev/nbd7"));
        assert_eq!(parse_device_name(&device_name(12)), Some(12));
        assert_eq!(parse_device_name("nbd"), None);
        assert_eq!(parse_device_name("nbd1p1"), None);
        assert_eq!(parse_device_name("loop0"), None);
    }

    #[test]
    fn backend_ids_round_trip_and_reject_others() {
        let id = BackendId {
            host: "h1".into(),
            pid: 42,
            sandbox: "sb:with:colons".into(),
        };
        let s = id.to_string();
        assert_eq!(s, "rootfork:h1:42:sb:with:colons");
        assert_eq!(BackendId::parse(&s), Some(id.clone()));
        assert_eq!(BackendId::parse(&format!("{s}\n")), Some(id));
        assert_eq!(BackendId::parse("qemu-nbd:h1:42:x"), None);
        assert_eq!(BackendId::parse("rootfork:h1:notapid:x"), None);
        assert_eq!(BackendId::parse("rootfork::1:x"), None);
        assert_eq!(BackendId::parse(""), None);
        assert_eq!(BackendId::this_process("a:b c", "s").host, "abc");
    }
}
