//! Diffs: what an overlay changed relative to its base, as a map of runs plus a packed data file.
//!
//! [`DiffMap`] is produced by [`Overlay::export_diff`](crate::Overlay::export_diff);
//! [`DiffLayer`] serves a base with a diff applied (what a resumed sandbox stacks its new overlay
//! on), and [`DiffMap::apply_to`] writes a diff into a copy of the base.

mod layer;
mod map;

pub use layer::DiffLayer;
pub use map::{DiffKind, DiffMap, DiffRun};
