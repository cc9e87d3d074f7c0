//! Block devices for rootfork.
//!
//! Everything a sandbox's root disk is made of lives here: the [`BlockDevice`] trait that the NBD
//! dispatcher serves, the read-only template device, the copy-on-write overlay that gives every
//! sandbox its own writable view of a shared template, and the diff export that turns an overlay's
//! dirty blocks into a new template layer.

mod device;
mod diff;
mod error;
mod grown;
pub mod layered;
mod overlay;
pub mod status;
mod sys;
mod template;

pub use device::{BlockDevice, BlockState, Extent};
pub use diff::{DiffKind, DiffLayer, DiffMap, DiffRun};
pub use error::{BlockError, Result, StateField};
pub use grown::Grown;
pub use layered::{BuildId, LayerError, LayeredTemplate, LocalStore};
pub use overlay::{
    state_path, Durability, Overlay, OverlayOptions, OverlayStats, ReopenReport, StateCopy,
    MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use status::{Contents, RangeStatus};
pub use template::{TemplateFile, TemplatePath, TEMPLATE_BLOCK_SIZE};
