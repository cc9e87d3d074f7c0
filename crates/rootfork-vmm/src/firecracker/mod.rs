//! Firecracker: the API client, the process launcher with a stable drive path, jailer support,
//! the `/proc/<pid>/fd` verification, and the [`FirecrackerVm`] flow tying them together.

mod client;
mod error;
mod jail_dir;
mod jailer;
mod link;
pub mod models;
mod namespace;
mod process;
mod verify;
mod vm;

pub use client::{root_drive_body, FirecrackerClient, RootDriveOptions};
pub use error::ApiError;
pub use jailer::{
    path_in_chroot, JailError, JailOwner, JailPathError, JailedDeviceNode, JailerConfig,
};
pub use link::{HostLink, LinkError, PARKED_TARGET};
pub use namespace::{NamespaceError, NamespacePlan};
pub use process::{ProcessError, VmmCommand, VmmProcess};
pub use verify::{opened_files, verify_opened, OpenedFile, TemplateIdentity, VerifyError};
pub use vm::{
    ColdBootConfig, FirecrackerVm, LaunchConfig, ResumeConfig, VmError, VmPhase,
    DEFAULT_STABLE_DRIVE_PATH,
};
