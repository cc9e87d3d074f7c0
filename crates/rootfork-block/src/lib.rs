//! Block devices for rootfork.
//!
//! Everything a sandbox's root disk is made of lives here: the [`BlockDevice`] trait that the NBD
//! dispatcher serves, the read-only template device, the copy-on-write overlay that gives every
//! sandbox its own writable view of a shared template, and the diff export that turns an overlay's
//! dirty blocks into a new template layer.

mod device;
mod error;
pub mod layered;

pub use device::{BlockDevice, BlockState, Extent};
pub use error::{BlockError, Result};
pub use layered::{BuildId, LayerError, LayeredTemplate, LocalStore};
