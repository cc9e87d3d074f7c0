//! Validated requests: [`SandboxSpec`] (what a create asks for) and [`VmSpec`] (the VM to boot
//! on the disk). The gRPC edge builds them from the wire messages; the checks live here so the
//! daemon's rules are tested without a server.

use std::path::{Path, PathBuf};

use rootfork_provider::ProviderKind;

/// The largest `memory_mib` accepted.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// The smallest non-zero `memory_mib` accepted.
pub const MIN_MEMORY_MIB: u32 = 16;
/// The most vCPUs accepted.
pub const MAX_VCPUS: u32 = 256;
/// The longest kernel command line accepted, in bytes.
pub const MAX_KERNEL_ARGS: usize = 4096;

/// Why a create request is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The provider kind is not one the API defines.
    #[error("unknown provider kind {0}")]
    UnknownProviderKind(i32),
    /// The daemon serves socket and kernel sandboxes only.
    #[error("the direct provider is not offered by the daemon")]
    ProviderNotOffered,
    /// The VMM kind is not one the API defines.
    #[error("vmm: unknown kind {0}")]
    UnknownVmmKind(i32),
    /// A host path the daemon opens must be absolute.
    #[error("vmm: {what} path {path:?} must be absolute")]
    RelativePath {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// `memory_mib` out of range.
    #[error("vmm: memory_mib {0} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    MemoryOutOfRange(u32),
    /// Too many vCPUs.
    #[error("vmm: vcpus {0} is more than {MAX_VCPUS}")]
    TooManyVcpus(u32),
    /// The kernel command line is too long.
    #[error("vmm: kernel_args is longer than {MAX_KERNEL_ARGS} bytes")]
    KernelArgsTooLong(usize),
    /// A QEMU VM cannot boot without a kernel.
    #[error("vmm: a QEMU VM needs a kernel")]
    QemuNeedsKernel,
    /// Firecracker takes a block device or file as its root drive: the daemon launches it on a
    /// kernel sandbox's `/dev/nbdN` only.
    #[error("vmm: the daemon runs Firecracker on the kernel provider only (its root drive is a /dev/nbdN)")]
    FirecrackerNeedsKernelProvider,
    /// A disk size that is not a whole number of 4 KiB blocks, or absurdly large.
    #[error("disk_size_bytes {0} must be a multiple of 4096 and at most {MAX_DISK_SIZE}")]
    BadDiskSize(u64),
    /// A disk smaller than its template.
    #[error("disk_size_bytes {disk} is smaller than the template's {template} bytes")]
    DiskSmallerThanTemplate {
        /// Asked for.
        disk: u64,
        /// The template's size.
        template: u64,
    },
}

/// The largest disk a sandbox may ask for (1 PiB).
pub const MAX_DISK_SIZE: u64 = 1 << 50;

/// Which VMM the settings are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmmKind {
    /// None named: the settings are recorded only.
    Unspecified,
    /// The daemon boots QEMU on the sandbox's disk.
    Qemu,
    /// With a kernel: the daemon launches Firecracker on the kernel sandbox's device; without
    /// one: recorded only (the orchestrator drives Firecracker).
    Firecracker,
}

/// A VM's settings, checked by [`VmSpec::validated`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// The VMM.
    pub kind: VmmKind,
    /// Guest kernel image (absolute).
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (absolute).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`None`: the daemon's default).
    pub kernel_args: Option<String>,
    /// Guest memory (`None`: the VMM's default).
    pub memory_mib: Option<u32>,
    /// vCPUs (`None`: the VMM's default).
    pub vcpus: Option<u32>,
}

fn absolute(what: &'static str, p: &Option<PathBuf>) -> Result<(), SpecError> {
    match p {
        Some(path) if !Path::new(path).is_absolute() => Err(SpecError::RelativePath {
            what,
            path: path.clone(),
        }),
        _ => Ok(()),
    }
}

impl VmSpec {
    /// The settings if they are usable: absolute paths, bounded memory, vCPUs and command
    /// line, and a kernel for QEMU.
    pub fn validated(self) -> Result<VmSpec, SpecError> {
        absolute("kernel", &self.kernel)?;
        absolute("initrd", &self.initrd)?;
        if let Some(m) = self.memory_mib {
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
                return Err(SpecError::MemoryOutOfRange(m));
            }
        }
        if let Some(n) = self.vcpus.filter(|&n| n > MAX_VCPUS) {
            return Err(SpecError::TooManyVcpus(n));
        }
        if let Some(len) = self
            .kernel_args
            .as_ref()
            .map(String::len)
            .filter(|&l| l > MAX_KERNEL_ARGS)
        {
            return Err(SpecError::KernelArgsTooLong(len));
        }
        if self.kind == VmmKind::Qemu && self.kernel.is_none() {
            return Err(SpecError::QemuNeedsKernel);
        }
        Ok(self)
    }

    /// Whether the daemon boots this VM itself.
    pub fn boots_qemu(&self) -> bool {
        self.kind == VmmKind::Qemu
    }

    /// Whether the daemon launches Firecracker for this VM (a kernel is given).
    pub fn runs_firecracker(&self) -> bool {
        self.kind == VmmKind::Firecracker && self.kernel.is_some()
    }
}

/// A create request: which template, which provider, which id and VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The template to fork (checked by the create against the store).
    pub template: String,
    /// The id asked for (`None`: the daemon picks one).
    pub id: Option<String>,
    /// Socket or kernel.
    pub provider: ProviderKind,
    /// A VM to boot on the disk, or settings to record.
    pub vm: Option<VmSpec>,
    /// A disk larger than the template (checked against it by the create).
    pub disk_size: Option<u64>,
    /// The most bytes the sandbox's writes may occupy.
    pub quota: Option<u64>,
}

impl SandboxSpec {
    /// A socket sandbox of `template` with no VM and a generated id.
    pub fn new(template: impl Into<String>) -> SandboxSpec {
        SandboxSpec {
            template: template.into(),
            id: None,
            provider: ProviderKind::Socket,
            vm: None,
            disk_size: None,
            quota: None,
        }
    }

    /// The request if the daemon can serve it.
    pub fn validated(self) -> Result<SandboxSpec, SpecError> {
        if !matches!(self.provider, ProviderKind::Socket | ProviderKind::Kernel) {
            return Err(SpecError::ProviderNotOffered);
        }
        if let Some(d) = self.disk_size {
            if d % 4096 != 0 || d > MAX_DISK_SIZE {
                return Err(SpecError::BadDiskSize(d));
            }
        }
        let vm = self.vm.map(VmSpec::validated).transpose()?;
        if vm.as_ref().is_some_and(VmSpec::runs_firecracker)
            && self.provider != ProviderKind::Kernel
        {
            return Err(SpecError::FirecrackerNeedsKernelProvider);
        }
        Ok(SandboxSpec { vm, ..self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu() -> VmSpec {
        VmSpec {
            kind: VmmKind::Qemu,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            kernel_args: None,
            memory_mib: None,
            vcpus: None,
        }
    }

    #[test]
    fn a_complete_qemu_spec_is_accepted_unchanged() {
        let v = VmSpec {
            initrd: Some("/boot/initrd".into()),
            kernel_args: Some("console=ttyS0".into()),
            memory_mib: Some(256),
            vcpus: Some(2),
            ..qemu()
        };
        assert_eq!(v.clone().validated(), Ok(v));
    }

    #[test]
    fn every_bound_is_checked() {
        let cases = [
            (
                VmSpec {
                    kernel: Some("vmlinuz".into()),
                    ..qemu()
                },
                SpecError::RelativePath {
                    what: "kernel",
                    path: "vmlinuz".into(),
                },
            ),
            (
                VmSpec {
                    initrd: Some("rel/initrd".into()),
                    ..qemu()
                },
                SpecError::RelativePath {
                    what: "initrd",
                    path: "rel/initrd".into(),
                },
            ),
            (
                VmSpec {
                    memory_mib: Some(15),
                    ..qemu()
                },
                SpecError::MemoryOutOfRange(15),
            ),
            (
                VmSpec {
                    memory_mib: Some(MAX_MEMORY_MIB + 1),
                    ..qemu()
                },
                SpecError::MemoryOutOfRange(MAX_MEMORY_MIB + 1),
            ),
            (
                VmSpec {
                    vcpus: Some(257),
                    ..qemu()
                },
                SpecError::TooManyVcpus(257),
            ),
            (
                VmSpec {
                    kernel_args: Some("x".repeat(4097)),
                    ..qemu()
                },
                SpecError::KernelArgsTooLong(4097),
            ),
            (
                VmSpec {
                    kernel: None,
                    ..qemu()
                },
                SpecError::QemuNeedsKernel,
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(spec.validated(), Err(want));
        }
    }

    #[test]
    fn edges_of_the_ranges_are_accepted() {
        for (m, n, args) in [(MIN_MEMORY_MIB, 256, 4096), (MAX_MEMORY_MIB, 0, 0)] {
            let v = VmSpec {
                memory_mib: Some(m),
                vcpus: Some(n),
                kernel_args: Some("a".repeat(args)),
                ..qemu()
            };
            assert!(v.validated().is_ok());
        }
    }

    #[test]
    fn firecracker_settings_need_no_kernel() {
        let v = VmSpec {
            kind: VmmKind::Firecracker,
            kernel: None,
            ..qemu()
        };
        assert!(v.validated().is_ok());
    }

    #[test]
    fn firecracker_with_a_kernel_needs_the_kernel_provider() {
        let fc = VmSpec {
            kind: VmmKind::Firecracker,
            ..qemu()
        };
        assert!(fc.runs_firecracker());
        let s = SandboxSpec {
            vm: Some(fc.clone()),
            ..SandboxSpec::new("t")
        };
        assert_eq!(
            s.validated(),
            Err(SpecError::FirecrackerNeedsKernelProvider)
        );
        let s = SandboxSpec {
            vm: Some(fc),
            provider: ProviderKind::Kernel,
            ..SandboxSpec::new("t")
        };
        assert_eq!(s.clone().validated(), Ok(s));
    }

    #[test]
    fn the_direct_provider_is_refused_and_vm_settings_are_checked() {
        let s = SandboxSpec {
            provider: ProviderKind::Direct,
            ..SandboxSpec::new("t")
        };
        assert_eq!(s.validated(), Err(SpecError::ProviderNotOffered));
        let s = SandboxSpec {
            vm: Some(VmSpec {
                vcpus: Some(1000),
                ..qemu()
            }),
            ..SandboxSpec::new("t")
        };
        assert_eq!(s.validated(), Err(SpecError::TooManyVcpus(1000)));
        let s = SandboxSpec {
            provider: ProviderKind::Kernel,
            ..SandboxSpec::new("t")
        };
        assert_eq!(s.clone().validated(), Ok(s));
        for bad in [4097, MAX_DISK_SIZE + 4096] {
            let s = SandboxSpec {
                disk_size: Some(bad),
                ..SandboxSpec::new("t")
            };
            assert_eq!(s.validated(), Err(SpecError::BadDiskSize(bad)));
        }
    }

    #[test]
    fn messages_name_the_field() {
        assert_eq!(
            SpecError::MemoryOutOfRange(1).to_string(),
            "vmm: memory_mib 1 is outside 16..=1048576"
        );
        assert_eq!(
            SpecError::RelativePath {
                what: "kernel",
                path: "k".into()
            }
            .to_string(),
            "vmm: kernel path \"k\" must be absolute"
        );
    }
}
