//! Layered templates: a base build plus diff layers, durable, versioned and checksummed.
//!
//! A *build* is an immutable pair of files — a data file and a map (header, lineage, the merged
//! whole-device mapping and the data checksums; byte layout in [`format`]). A base build comes
//! from a raw image ([`LocalStore::import_image`]); each layer is a diff (an overlay's exported
//! data and zero runs) over a parent build ([`LocalStore::create_layer`]). Every layer's map
//! already holds the parent's mapping merged with its diff, so [`LayeredTemplate`] resolves a
//! read with one binary search, whatever the depth.
//!
//! Design notes and measured numbers: `docs/template-store.md`.

mod error;
mod flatten;
pub mod format;
mod id;
mod local;
mod mapping;
mod pause;
mod scope;
mod source;
mod template;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{LayerError, LayerResult};
pub use format::{BuildHeader, BuildMap};
pub use id::BuildId;
pub use local::{BuildOptions, LayerDiff, LocalStore, DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE};
pub use mapping::{DiffSource, MapRun, Mapping, RunKind};
pub use scope::RequestScope;
pub use source::{BuildData, FileData, MemData};
pub use template::{BuildResolver, LayeredTemplate};
pub use writer::{DATA_FILE, MAP_FILE};
