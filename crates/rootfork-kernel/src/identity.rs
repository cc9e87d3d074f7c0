//! Names: the one place `/dev/nbdN` is formatted, and who attached a device.
//!
//! A device's backend identifier (`/sys/block/nbdN/backend`) is
//! `rootfork:<boot id>:<instance id>:<sandbox>`. The boot id is the kernel's
//! (`/proc/sys/kernel/random/boot_id`, the same in every container on the host); the instance id
//! is a random name of one rootfork *instance*: a daemon keeps its id in its state directory (so
//! the daemon restarted in a new pid namespace or container is the same instance), and each
//! `rootfork nbd attach` run makes a new one. Neither a pid nor a host name appears: pids are
//! per namespace and reused, host names change when a container is recreated. Whether the owner
//! still lives is decided by the slot's claim lock, never by these names.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Prefix of every backend identifier rootfork sets.
pub const BACKEND_PREFIX: &str = "rootfork";

/// Where the kernel publishes its boot id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Bytes of randomness in a new instance id (printed as hex).
const INSTANCE_ID_BYTES: usize = 8;

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

/// Errors naming a rootfork instance.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The kernel's boot id cannot be read (is `/proc` mounted?).
    #[error("reading the kernel's boot id ({BOOT_ID_PATH})")]
    BootId(#[source] io::Error),
    /// No randomness for a new instance id.
    #[error("reading /dev/urandom for a new instance id")]
    Random(#[source] io::Error),
    /// The instance id file cannot be read or written.
    #[error("instance id file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The instance id file holds something that is not an instance id.
    #[error("instance id file {0} does not hold an instance id (1 to 64 of [0-9A-Za-z_-])")]
    Malformed(PathBuf),
    /// An instance id given by the caller is not one.
    #[error("{0:?} is not an instance id (1 to 64 of [0-9A-Za-z_-])")]
    Invalid(String),
}

/// Whether `s` can be an instance id: 1 to 64 of `[0-9A-Za-z_-]` (no `:`, which separates the
/// fields of a backend identifier).
pub fn valid_instance_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The kernel's boot id, without its newline.
pub fn boot_id() -> Result<String, IdentityError> {
    let raw = std::fs::read_to_string(BOOT_ID_PATH).map_err(IdentityError::BootId)?;
    let id = raw.trim();
    if id.is_empty() || id.contains(':') {
        return Err(IdentityError::BootId(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected contents {raw:?}"),
        )));
    }
    Ok(id.to_owned())
}

/// A fresh random instance id (16 hex digits).
pub fn new_instance_id() -> Result<String, IdentityError> {
    let mut b = [0u8; INSTANCE_ID_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(IdentityError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Reads the instance id kept in `path`, or makes one and keeps it there (created `0600`,
/// exclusively, never through a symlink).
pub fn load_or_create_instance_id(path: &Path) -> Result<String, IdentityError> {
    let file_err = |source| IdentityError::File {
        path: path.to_owned(),
        source,
    };
    let read = |path: &Path| -> Result<Option<String>, IdentityError> {
        let mut f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(e)),
        };
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(file_err)?;
        let id = s.trim();
        if valid_instance_id(id) {
            Ok(Some(id.to_owned()))
        } else {
            Err(IdentityError::Malformed(path.to_owned()))
        }
    };
    if let Some(id) = read(path)? {
        return Ok(id);
    }
    let id = new_instance_id()?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(file_err)?;
            Ok(id)
        }
        // Made by someone else between our read and create: theirs wins.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| IdentityError::Malformed(path.to_owned()))
        }
        Err(e) => Err(file_err(e)),
    }
}

/// Who attaches devices: this boot and one rootfork instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    /// The kernel's boot id.
    pub boot: String,
    /// The instance id.
    pub instance: String,
}

impl Identity {
    /// An identity with explicit names (tests, and a daemon that read its instance id).
    pub fn new(boot: &str, instance: &str) -> Result<Self, IdentityError> {
        if boot.is_empty() || boot.contains(':') {
            return Err(IdentityError::Invalid(boot.to_owned()));
        }
        if !valid_instance_id(instance) {
            return Err(IdentityError::Invalid(instance.to_owned()));
        }
        Ok(Identity {
            boot: boot.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// This boot, and the instance `instance` (a daemon's kept id).
    pub fn this_boot(instance: &str) -> Result<Self, IdentityError> {
        Identity::new(&boot_id()?, instance)
    }

    /// This boot, and a new instance (one `rootfork nbd attach` run).
    pub fn new_instance() -> Result<Self, IdentityError> {
        Identity::this_boot(&new_instance_id()?)
    }

    /// The backend identifier of a device this instance attaches for `sandbox`.
    pub fn backend(&self, sandbox: &str) -> BackendId {
        BackendId {
            boot: self.boot.clone(),
            instance: self.instance.clone(),
            sandbox: sandbox.to_owned(),
        }
    }

    /// Whether `b` was attached by this very instance in this boot.
    pub fn owns(&self, b: &BackendId) -> bool {
        b.boot == self.boot && b.instance == self.instance
    }
}

/// A parsed backend identifier.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendId {
    /// The boot the device was attached in.
    pub boot: String,
    /// The rootfork instance that attached it.
    pub instance: String,
    /// The sandbox (may contain `:`; it is the last field).
    pub sandbox: String,
}

impl BackendId {
    /// Parses `rootfork:<boot>:<instance>:<sandbox>`; anything else is not rootfork's.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim_end_matches(['\n', '\0']).splitn(4, ':');
        if it.next()? != BACKEND_PREFIX {
            return None;
        }
        let boot = it.next()?.to_owned();
        let instance = it.next()?.to_owned();
        let sandbox = it.next()?.to_owned();
        if boot.is_empty() || !valid_instance_id(&instance) {
            return None;
        }
        Some(BackendId {
            boot,
            instance,
            sandbox,
        })
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{BACKEND_PREFIX}:{}:{}:{}",
            self.boot, self.instance, self.sandbox
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
        let me = Identity::new("b00t", "inst-1").unwrap();
        let id = me.backend("sb:with:colons");
        let s = id.to_string();
        assert_eq!(s, "rootfork:b00t:inst-1:sb:with:colons");
        assert_eq!(BackendId::parse(&s), Some(id.clone()));
        assert_eq!(BackendId::parse(&format!("{s}\n")), Some(id.clone()));
        assert!(me.owns(&id));
        assert!(!Identity::new("b00t", "inst-2").unwrap().owns(&id));
        assert!(!Identity::new("other", "inst-1").unwrap().owns(&id));
        assert_eq!(BackendId::parse("qemu-nbd:h1:42:x"), None);
        assert_eq!(BackendId::parse("rootfork::i:x"), None);
        assert_eq!(BackendId::parse("rootfork:b:bad id:x"), None);
        assert_eq!(BackendId::parse("rootfork:b:i"), None);
        assert_eq!(BackendId::parse(""), None);
        assert!(Identity::new("b", "a:b").is_err());
        assert!(Identity::new("b:c", "a").is_err());
        assert!(Identity::new("b", "").is_err());
    }

    #[test]
    fn new_instance_ids_differ_and_the_boot_id_is_read() {
        let a = new_instance_id().unwrap();
        let b = new_instance_id().unwrap();
        assert!(valid_instance_id(&a) && a.len() == 16, "{a}");
        assert_ne!(a, b);
        let boot = boot_id().unwrap();
        assert_eq!(boot, boot_id().unwrap());
        assert!(!boot.is_empty() && !boot.contains(['\n', ':']));
    }

    #[test]
    fn an_instance_id_file_is_made_once_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("instance-id");
        let first = load_or_create_instance_id(&p).unwrap();
        assert_eq!(load_or_create_instance_id(&p).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, "not:an id\n").unwrap();
        assert!(matches!(
            load_or_create_instance_id(&p),
            Err(IdentityError::Malformed(_))
        ));
        // A symlink in its place is refused, not followed.
        let target = t.path().join("target");
        std::fs::write(&target, "abc\n").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            load_or_create_instance_id(&link),
            Err(IdentityError::File { .. })
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "abc\n");
    }
}
