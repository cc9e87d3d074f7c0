//! Shared fixtures of the Firecracker integration tests: the API descriptions, a loop device
//! standing in for `/dev/nbdN`, a template file, and the double's command line (the double uses
//! its built-in description of Firecracker's API, or the Swagger document `$ROOTFORK_FC_SPEC`
//! names).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rootfork_block::TemplatePath;
use rootfork_fc_double::Spec;
use rootfork_vmm::firecracker::{TemplateIdentity, VmmCommand};
use rootfork_vmm::{DevicePath, ReadyDevice};
use serde_json::Value;

/// The API descriptions the tests validate against: the built-in one always, and the full
/// Swagger document `$ROOTFORK_FC_SPEC` names when it is set.
pub fn specs() -> Vec<(String, Spec)> {
    let mut specs = vec![("built-in".to_owned(), rootfork_fc_double::description())];
    if let Some(path) = rootfork_fc_double::external_spec_path() {
        specs.push((path.display().to_string(), Spec::load(&path).unwrap()));
    }
    specs
}

/// The version the double reports: the external spec's when one is set, else the built-in
/// description's.
pub fn served_version() -> String {
    specs().pop().map(|(_, s)| s.version).unwrap_or_default()
}

/// The `rootfork-fc-double` executable (built by `cargo build` on first use).
pub fn double_binary() -> PathBuf {
    rootfork_fc_double::binary_path().unwrap()
}

/// The double's command line (the launcher adds `--api-sock` and `--id`).
pub fn double_command(report: &Path) -> VmmCommand {
    VmmCommand::new(double_binary()).arg("--report").arg(report)
}

/// A loop device over a sparse file; detached (and the file removed) on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    pub backing: PathBuf,
}

impl LoopDevice {
    /// A `size`-byte loop device whose first bytes are `marker`.
    pub fn new(dir: &Path, name: &str, size: u64, marker: &[u8]) -> Self {
        let backing = dir.join(name);
        let f = std::fs::File::create(&backing).unwrap();
        f.set_len(size).unwrap();
        std::fs::write(&backing, marker).unwrap();
        f.set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup failed (tests need root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { path, backing }
    }

    /// The device verified as a provider would return it.
    pub fn ready(&self) -> ReadyDevice {
        ReadyDevice::verify(DevicePath::new(&self.path)).unwrap()
    }

    /// Its `st_rdev`.
    pub fn rdev(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).unwrap().rdev()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// A template image file and its identity.
pub fn template(dir: &Path) -> (TemplatePath, TemplateIdentity) {
    let p = dir.join("template.ext4");
    std::fs::write(&p, vec![0x5a; 1 << 20]).unwrap();
    let t = TemplatePath::new(&p);
    let id = TemplateIdentity::of(&t).unwrap();
    (t, id)
}

/// A stand-in kernel image for the double (it only opens it).
pub fn kernel(dir: &Path) -> String {
    let p = dir.join("vmlinux");
    std::fs::write(&p, b"not really a kernel").unwrap();
    p.to_string_lossy().into_owned()
}

/// Reads the double's report.
pub fn report(path: &Path) -> Vec<Value> {
    rootfork_fc_double::read_report(path).unwrap()
}

/// The `open` events of a report.
pub fn opens(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["event"] == "open").collect()
}

/// The requests of a report as `"METHOD path status"`.
pub fn requests(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "request")
        .map(|e| {
            format!(
                "{} {} {}",
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"]
            )
        })
        .collect()
}
