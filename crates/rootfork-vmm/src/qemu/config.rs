//! The QEMU binary and a typed VM description rendered into QEMU's command line.
//!
//! Rendering is a pure function ([`QemuConfig::args`]) so the exact command line is unit-tested
//! without starting anything.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::accel::Accel;
use super::disk::RootDisk;
use super::error::QemuError;

/// Where QEMU lives and how it is run: the binary, its module directory (the TCG accelerator is a
/// loadable module in Debian's packaging) and its firmware directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    path: PathBuf,
    module_dir: Option<PathBuf>,
    firmware_dirs: Vec<PathBuf>,
}

impl QemuBinary {
    /// The binary at `path`, with Debian's firmware directories (`/usr/share/seabios`,
    /// `/usr/share/qemu`) and no module directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QemuBinary {
            path: path.into(),
            module_dir: None,
            firmware_dirs: vec!["/usr/share/seabios".into(), "/usr/share/qemu".into()],
        }
    }

    /// From the environment `tests/vm/assets.sh` sets up: `QEMU` (default
    /// `qemu-system-x86_64` on `PATH`) and `QEMU_MODULE_DIR`.
    pub fn from_env() -> Self {
        let path = std::env::var_os("QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut b = QemuBinary::new(path);
        b.module_dir = std::env::var_os("QEMU_MODULE_DIR").map(PathBuf::from);
        b
    }

    /// Sets the directory QEMU loads its modules from (`QEMU_MODULE_DIR`).
    pub fn with_module_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.module_dir = Some(dir.into());
        self
    }

    /// Replaces the firmware search directories (`-L`).
    pub fn with_firmware_dirs(mut self, dirs: Vec<PathBuf>) -> Self {
        self.firmware_dirs = dirs;
        self
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command for this binary with its environment, firmware directories and `-nodefaults`
    /// (no default NIC, display, CD-ROM or floppy) already applied.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        if let Some(dir) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", dir);
        }
        for dir in &self.firmware_dirs {
            cmd.arg("-L").arg(dir);
        }
        cmd.args(["-nodefaults", "-no-user-config"]);
        cmd
    }
}

/// A VM to boot: a Linux kernel (with optional initrd and command line) whose root disk is a
/// provider's device, with its serial console written to a file.
#[derive(Debug)]
pub struct QemuConfig {
    /// Accelerator.
    pub accel: Accel,
    /// Machine type (`q35` by default; `microvm` needs extra tuning under TCG).
    pub machine: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// The kernel image.
    pub kernel: PathBuf,
    /// An optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: String,
    /// The root disk, seen by the guest as the first virtio-blk disk (`/dev/vda`).
    pub root: RootDisk,
    /// Opens the root disk read-only in QEMU.
    pub read_only_root: bool,
    /// The file the guest's first serial port (`ttyS0`) is appended to.
    pub serial: PathBuf,
    /// Adds a VM generation ID device (`-device vmgenid`) whose GUID QEMU draws afresh each
    /// time the process starts (`guid=auto`). The GUID is not part of the migration stream
    /// (only the guest address of its buffer is): a VM restored from a saved state gets the new
    /// process's GUID written into its memory and an ACPI notification, and a Linux guest
    /// reseeds its random number generator. A restore must use the setting of the saved VM
    /// (the device is part of the machine).
    pub vmgenid: bool,
    /// The root disk's serial number (`virtio-blk-pci,serial=`), which a Linux guest reads as
    /// `/sys/block/vda/serial`: at most [`DISK_SERIAL_MAX`] bytes of `[A-Za-z0-9._~-]`. It is
    /// a property of the device, not migrated state: the guest reads it from the device at each
    /// read, so a VM restored with another serial sees the new one.
    pub disk_serial: Option<String>,
    /// For an NBD root: how long QEMU holds the guest's I/O while the connection is down and
    /// it reconnects to the same socket (`reconnect-delay`, seconds; a restarting server's
    /// gap). `None` or 0: I/O on a lost connection fails at once.
    pub nbd_reconnect_delay_secs: Option<u32>,
}

/// The most bytes of a virtio-blk serial a guest can read (`VIRTIO_BLK_ID_BYTES`).
pub const DISK_SERIAL_MAX: usize = 20;

impl QemuConfig {
    /// A config with q35, 256 MiB, one vCPU, a read-write root and TCG.
    pub fn new(kernel: impl Into<PathBuf>, root: RootDisk, serial: impl Into<PathBuf>) -> Self {
        QemuConfig {
            accel: Accel::Tcg,
            machine: "q35".into(),
            memory_mib: 256,
            cpus: 1,
            kernel: kernel.into(),
            initrd: None,
            append: "console=ttyS0".into(),
            root,
            read_only_root: false,
            serial: serial.into(),
            vmgenid: false,
            disk_serial: None,
            nbd_reconnect_delay_secs: None,
        }
    }

    /// Checks that the files QEMU will be asked to open exist.
    pub fn check_files(&self) -> Result<(), QemuError> {
        if !self.kernel.is_file() {
            return Err(QemuError::Missing {
                what: "kernel",
                path: self.kernel.clone(),
            });
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(QemuError::Missing {
                    what: "initrd",
                    path: initrd.clone(),
                });
            }
        }
        Ok(())
    }

    /// QEMU's arguments for this VM (after the binary's own, see [`QemuBinary::command`]).
    pub fn args(&self) -> Result<Vec<OsString>, QemuError> {
        if self.memory_mib < 16 {
            return Err(QemuError::InvalidConfig(format!(
                "{} MiB of memory is too little",
                self.memory_mib
            )));
        }
        if self.cpus == 0 || self.cpus > 255 {
            return Err(QemuError::InvalidConfig(format!("{} vCPUs", self.cpus)));
        }
        if self.machine.is_empty() || self.machine.contains(',') {
            return Err(QemuError::InvalidConfig(format!(
                "machine type {:?}",
                self.machine
            )));
        }
        let serial = option_path("serial file", &self.serial)?;
        let mut blockdev = self.root.blockdev("root")?;
        if self.read_only_root {
            blockdev.push_str(",read-only=on");
        }
        let mut disk = String::from("virtio-blk-pci,drive=root");
        if let Some(serial) = &self.disk_serial {
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-');
            if serial.is_empty() || serial.len() > DISK_SERIAL_MAX || !serial.chars().all(ok) {
                return Err(QemuError::InvalidConfig(format!("disk serial {serial:?}")));
            }
            disk.push_str(",serial=");
            disk.push_str(serial);
        }
        if let (RootDisk::Nbd(_), Some(secs)) = (&self.root, self.nbd_reconnect_delay_secs) {
            if secs > 0 {
                blockdev.push_str(&format!(",reconnect-delay={secs}"));
            }
        }
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-accel");
        push(self.accel.as_arg());
        push("-M");
        push(&self.machine);
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        push("-display");
        push("none");
        push("-no-reboot");
        // Appended to, never truncated by QEMU: a VM restored from a saved state goes on
        // writing the console file its first boot started (a boot truncates it itself).
        push("-chardev");
        push(&format!("file,id=console,path={serial},append=on"));
        push("-serial");
        push("chardev:console");
        push("-blockdev");
        push(&blockdev);
        push("-device");
        push(&disk);
        if self.vmgenid {
            push("-device");
            push("vmgenid,guid=auto");
        }
        a.push("-kernel".into());
        a.push(self.kernel.clone().into_os_string());
        if let Some(initrd) = &self.initrd {
            a.push("-initrd".into());
            a.push(initrd.clone().into_os_string());
        }
        if !self.append.is_empty() {
            a.push("-append".into());
            a.push(self.append.clone().into());
        }
        Ok(a)
    }
}

/// A path as an option value: UTF-8 and free of the commas QEMU's option parser splits on.
fn option_path<'a>(what: &str, p: &'a Path) -> Result<&'a str, QemuError> {
    let s = p
        .to_str()
        .ok_or_else(|| QemuError::InvalidConfig(format!("{what} {p:?} is not UTF-8")))?;
    if s.is_empty() || s.contains(',') {
        return Err(QemuError::InvalidConfig(format!(
            "{what} {s:?} is empty or has a comma"
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::super::disk::NbdEndpoint;
    use super::*;

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn nbd_config() -> QemuConfig {
        let ep = NbdEndpoint::new("/run/rf/sb1.sock", "sb1").unwrap();
        let mut c = QemuConfig::new("/k/vmlinuz", RootDisk::Nbd(ep), "/tmp/sb1.console");
        c.initrd = Some("/k/initrd.gz".into());
        c.append = "console=ttyS0 root=/dev/vda rw".into();
        c
    }

    #[test]
    fn an_nbd_root_may_wait_for_its_server_to_come_back() {
        let mut c = nbd_config();
        c.nbd_reconnect_delay_secs = Some(120);
        let a = strs(&c.args().unwrap());
        let i = a.iter().position(|s| s == "-blockdev").unwrap();
        assert_eq!(
            a[i + 1],
            "driver=nbd,node-name=root,server.type=unix,server.path=/run/rf/sb1.sock,export=sb1,reconnect-delay=120"
        );
        c.nbd_reconnect_delay_secs = Some(0);
        let a = strs(&c.args().unwrap());
        assert!(!a.iter().any(|s| s.contains("reconnect-delay")), "{a:?}");
    }

    #[test]
    fn nbd_root_renders_unix_blockdev_and_virtio_disk() {
        let a = strs(&nbd_config().args().unwrap());
        let i = a.iter().position(|s| s == "-blockdev").unwrap();
        assert_eq!(
            a[i + 1],
            "driver=nbd,node-name=root,server.type=unix,server.path=/run/rf/sb1.sock,export=sb1"
        );
        assert_eq!(a[i + 2], "-device");
        assert_eq!(a[i + 3], "virtio-blk-pci,drive=root");
        let pair = |k: &str| a[a.iter().position(|s| s == k).unwrap() + 1].clone();
        assert_eq!(pair("-accel"), "tcg");
        assert_eq!(pair("-M"), "q35");
        assert_eq!(pair("-m"), "256");
        assert_eq!(
            pair("-chardev"),
            "file,id=console,path=/tmp/sb1.console,append=on"
        );
        assert_eq!(pair("-serial"), "chardev:console");
        assert_eq!(pair("-kernel"), "/k/vmlinuz");
        assert_eq!(pair("-initrd"), "/k/initrd.gz");
        assert_eq!(pair("-append"), "console=ttyS0 root=/dev/vda rw");
        // The root disk is only ever reached through the NBD driver, never as a file.
        assert!(!a
            .iter()
            .any(|s| s.contains("driver=file") || s.starts_with("file=")));
    }

    #[test]
    fn empty_export_is_omitted_and_read_only_is_passed() {
        let ep = NbdEndpoint::new("/s.sock", "").unwrap();
        let mut c = QemuConfig::new("/k", RootDisk::Nbd(ep), "/c");
        c.read_only_root = true;
        c.accel = Accel::Kvm;
        let a = strs(&c.args().unwrap());
        assert!(a.contains(
            &"driver=nbd,node-name=root,server.type=unix,server.path=/s.sock,read-only=on"
                .to_string()
        ));
        assert!(a.contains(&"kvm".to_string()));
        assert!(!a.contains(&"-initrd".to_string()));
    }

    #[test]
    fn the_disk_serial_is_passed_when_given_and_checked() {
        let mut c = nbd_config();
        assert!(strs(&c.args().unwrap()).contains(&"virtio-blk-pci,drive=root".to_string()));
        c.disk_serial = Some("sb-1.fork~0_a".into());
        assert!(strs(&c.args().unwrap())
            .contains(&"virtio-blk-pci,drive=root,serial=sb-1.fork~0_a".to_string()));
        for bad in ["", "a,b", "x y", &"x".repeat(DISK_SERIAL_MAX + 1)] {
            c.disk_serial = Some(bad.into());
            assert!(
                matches!(c.args(), Err(QemuError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_generation_id_device_is_added_only_when_asked() {
        let mut c = nbd_config();
        assert!(!strs(&c.args().unwrap())
            .iter()
            .any(|s| s.contains("vmgenid")));
        c.vmgenid = true;
        let a = strs(&c.args().unwrap());
        let at = a.iter().position(|s| s == "vmgenid,guid=auto").unwrap();
        assert_eq!(a[at - 1], "-device");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = nbd_config();
        c.serial = "/tmp/a,b".into();
        assert!(matches!(c.args(), Err(QemuError::InvalidConfig(_))));
        let mut c = nbd_config();
        c.memory_mib = 1;
        assert!(matches!(c.args(), Err(QemuError::InvalidConfig(_))));
        let mut c = nbd_config();
        c.cpus = 0;
        assert!(matches!(c.args(), Err(QemuError::InvalidConfig(_))));
        assert!(NbdEndpoint::new("/a,b.sock", "x").is_err());
        assert!(NbdEndpoint::new("rel.sock", "x").is_err());
        assert!(NbdEndpoint::new("/s.sock", "a,b").is_err());
    }

    #[test]
    fn ready_device_root_uses_file_or_host_device_driver() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rootfs.ext4");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let dev = crate::ReadyDevice::verify(crate::DevicePath::new(&f)).unwrap();
        let c = QemuConfig::new("/k", RootDisk::Device(dev), "/c");
        let a = strs(&c.args().unwrap());
        let want = format!("driver=file,node-name=root,filename={}", f.display());
        assert!(a.contains(&want), "{a:?}");
    }

    #[test]
    fn missing_kernel_is_reported() {
        let c = nbd_config();
        assert!(matches!(
            c.check_files(),
            Err(QemuError::Missing { what: "kernel", .. })
        ));
    }

    #[test]
    fn uri_is_percent_encoded() {
        let ep = NbdEndpoint::new("/tmp/my sock", "a b").unwrap();
        assert_eq!(ep.uri(), "nbd+unix:///a%20b?socket=/tmp/my%20sock");
    }

    #[test]
    fn binary_command_carries_firmware_and_module_dir() {
        let b = QemuBinary::new("/q/qemu").with_module_dir("/q/mods");
        let cmd = b.command();
        let args: Vec<_> = cmd
            .get_args()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-L",
                "/usr/share/seabios",
                "-L",
                "/usr/share/qemu",
                "-nodefaults",
                "-no-user-config"
            ]
        );
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(
            env,
            [(
                std::ffi::OsStr::new("QEMU_MODULE_DIR"),
                Some(std::ffi::OsStr::new("/q/mods"))
            )]
        );
    }
}
