//! The run-time half of "one path, by construction" for QEMU: before the guest runs, look at what
//! the QEMU process really holds open (`/proc/<pid>/fd`, compared by `st_rdev` or inode) and
//! refuse to continue if it opened a template, or if a device root disk is not among its files.
//!
//! For an NBD root QEMU opens no image at all (it connects to the provider's socket), so only
//! the "no template" half applies.

use crate::firecracker::{opened_files, verify_opened, TemplateIdentity, VerifyError};

use super::disk::RootDisk;

/// Checks process `pid` against `root` and `templates` (see the module docs).
pub fn verify_root(
    pid: u32,
    root: &RootDisk,
    templates: &[TemplateIdentity],
) -> Result<(), VerifyError> {
    match root {
        RootDisk::Device(dev) => verify_opened(pid, dev, templates).map(|_| ()),
        RootDisk::Nbd(_) => {
            let opened = opened_files(pid).map_err(|source| VerifyError::Proc { pid, source })?;
            for file in opened {
                let Some(id) = file.identity else { continue };
                if let Some(t) = templates.iter().find(|t| t.identity().same_disk(&id)) {
                    return Err(VerifyError::TemplateOpened {
                        pid,
                        template: t.path().to_owned(),
                        opened: file,
                    });
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use rootfork_block::TemplatePath;

    use super::*;
    use crate::qemu::NbdEndpoint;
    use crate::{DevicePath, ReadyDevice};

    /// A process holding `path` open on fd 3 (read-only), killed on drop.
    struct Holder(Child);

    impl Holder {
        fn new(path: &std::path::Path) -> Holder {
            let child = Command::new("sh")
                .arg("-c")
                .arg("exec 3<\"$0\"; exec sleep 30")
                .arg(path)
                .spawn()
                .unwrap();
            // Wait until fd 3 is there.
            let fd = format!("/proc/{}/fd/3", child.id());
            for _ in 0..500 {
                if std::fs::read_link(&fd).is_ok_and(|t| t == path) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Holder(child)
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_process_holding_the_template_is_refused_for_either_root_kind() {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("template.ext4");
        std::fs::write(&tpl, vec![1u8; 8192]).unwrap();
        let dev = dir.path().join("sandbox.ext4");
        std::fs::write(&dev, vec![2u8; 8192]).unwrap();
        let ids = [TemplateIdentity::of(&TemplatePath::new(&tpl)).unwrap()];

        let h = Holder::new(&tpl);
        let nbd = RootDisk::Nbd(NbdEndpoint::new(dir.path().join("s.sock"), "x").unwrap());
        assert!(matches!(
            verify_root(h.0.id(), &nbd, &ids),
            Err(VerifyError::TemplateOpened { .. })
        ));
        let ready = ReadyDevice::verify(DevicePath::new(&dev)).unwrap();
        assert!(matches!(
            verify_root(h.0.id(), &RootDisk::Device(ready.clone()), &ids),
            Err(VerifyError::TemplateOpened { .. })
        ));
        drop(h);

        let h = Holder::new(&dev);
        verify_root(h.0.id(), &RootDisk::Device(ready), &ids).unwrap();
        verify_root(h.0.id(), &nbd, &ids).unwrap();
        let other = dir.path().join("other.ext4");
        std::fs::write(&other, vec![3u8; 8192]).unwrap();
        let not_held = ReadyDevice::verify(DevicePath::new(&other)).unwrap();
        assert!(matches!(
            verify_root(h.0.id(), &RootDisk::Device(not_held), &ids),
            Err(VerifyError::DeviceNotOpened { .. })
        ));
    }
}
