//! Which attachment a block device node stands for right now: its `backend` attribute in sysfs
//! (`/sys/dev/block/<major>:<minor>/backend`, the identifier an NBD device was connected with).
//!
//! `st_rdev` proves the slot (`/dev/nbd3`), not the attachment: a slot released and connected
//! again for another sandbox has the same device number. The backend identifier names the
//! attachment (rootfork's carries the boot, the instance and the sandbox), so comparing it with
//! the one recorded when the device was verified tells a re-attached slot from the same one.

use std::io;
use std::path::Path;

/// The backend identifier of block device `rdev` on the host (`None`: none is set, as for a
/// device that is not an NBD device or was connected without one).
pub fn block_attachment(rdev: u64) -> io::Result<Option<String>> {
    block_attachment_in(Path::new("/sys"), rdev)
}

/// [`block_attachment`] under another sysfs root.
pub fn block_attachment_in(sys: &Path, rdev: u64) -> io::Result<Option<String>> {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let path = sys.join(format!("dev/block/{major}:{minor}/backend"));
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim_end_matches(['\n', '\0']);
            Ok((!s.is_empty()).then(|| s.to_owned()))
        }
        // No attribute (not connected, or not NBD), or removed by a teardown while read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_backend_of_a_device_number() {
        let t = tempfile::tempdir().unwrap();
        let rdev = nix::sys::stat::makedev(43, 96);
        assert_eq!(block_attachment_in(t.path(), rdev).unwrap(), None);
        let d = t.path().join("dev/block/43:96");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("backend"), "rootfork:b:i:sb\n").unwrap();
        assert_eq!(
            block_attachment_in(t.path(), rdev).unwrap().as_deref(),
            Some("rootfork:b:i:sb")
        );
        // Another slot is another device number.
        let other = nix::sys::stat::makedev(43, 32);
        assert_eq!(block_attachment_in(t.path(), other).unwrap(), None);
    }
}
