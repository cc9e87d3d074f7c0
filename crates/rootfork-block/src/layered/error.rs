//! Errors of the layered template format.
//!
//! Opening or creating a layer refuses anything that does not fit exactly — a foreign file, a
//! newer format, a damaged map, a layer over the wrong parent or of the wrong geometry — with a
//! variant callers can match on. Data corruption found while serving reads is not a
//! [`LayerError`]: it fails that one request with `EIO` (see [`LayerError::into_block`]).

use std::io;

use super::id::BuildId;
use crate::error::BlockError;

/// Result alias for the layered template format.
pub type LayerResult<T> = std::result::Result<T, LayerError>;

/// Why a build or layered template was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The text is not a build id (32 hex digits, not all zero).
    #[error("{0:?} is not a build id")]
    BadBuildId(String),
    /// The map does not start with the build magic.
    #[error("build {what}: bad magic, not a rootfork build map")]
    BadMagic {
        /// Which map (a build id or a path).
        what: String,
    },
    /// The map was written by a format version this code does not read.
    #[error(
        "build {what}: unsupported format version {found} (this code reads version {supported})"
    )]
    UnsupportedVersion {
        /// Which map.
        what: String,
        /// The version in the file.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// A checksum over the header or the whole map does not match.
    #[error("build {what}: {part} checksum mismatch")]
    MapChecksum {
        /// Which map.
        what: String,
        /// `"header"` or `"map"`.
        part: &'static str,
    },
    /// The map's fields are inconsistent or out of bounds.
    #[error("build {what}: malformed map: {reason}")]
    Malformed {
        /// Which map.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A referenced build is not in the store.
    #[error("build {0} not found")]
    MissingBuild(BuildId),
    /// A build found under an id claims another id.
    #[error("build stored as {expected} claims to be {found}")]
    WrongBuild {
        /// The id it was looked up by.
        expected: BuildId,
        /// The id in its header.
        found: BuildId,
    },
    /// A layer over this parent would pass the deepest lineage a map may hold
    /// ([`MAX_GENERATIONS`](super::format::MAX_GENERATIONS)): it could never be opened.
    #[error("build {parent} is generation {generation}: a layer over it would pass the {limit} generations a chain may have (flatten it first)")]
    TooManyGenerations {
        /// The parent.
        parent: BuildId,
        /// Its generation.
        generation: u64,
        /// The limit.
        limit: u64,
    },
    /// A layer's recorded ancestry does not match the builds in the store.
    #[error("layer {layer}: ancestor {ancestor} does not match (expected generation {expected_generation} with lineage {expected_lineage}, found {found})")]
    WrongParent {
        /// The layer being opened or created.
        layer: BuildId,
        /// The ancestor that does not fit.
        ancestor: BuildId,
        /// The generation the layer expects of it.
        expected_generation: u64,
        /// The lineage the layer expects of it, as text.
        expected_lineage: String,
        /// What the stored ancestor says, as text.
        found: String,
    },
    /// Two builds (or a build and a diff) disagree on the device size or block size.
    #[error("geometry mismatch: expected {expected_size} bytes in {expected_block_size}-byte blocks, found {found_size} bytes in {found_block_size}-byte blocks")]
    Geometry {
        /// Size of the parent.
        expected_size: u64,
        /// Block size of the parent.
        expected_block_size: u32,
        /// Size of the child or diff.
        found_size: u64,
        /// Block size of the child or diff.
        found_block_size: u32,
    },
    /// A build's data file is not the length its map records.
    #[error("build {id}: data is {found} bytes, its map says {expected}")]
    DataLength {
        /// The build.
        id: BuildId,
        /// Length recorded in the map.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// A diff handed to `create_layer` is not ascending, overlaps, or leaves the device.
    #[error("invalid diff: {0}")]
    InvalidDiff(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        LayerError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn malformed(what: impl ToString, reason: impl Into<String>) -> Self {
        LayerError::Malformed {
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    /// Converts to a block-layer error for a request path (everything becomes `EIO` except I/O
    /// errors that carry their own errno).
    pub fn into_block(self, context: &'static str) -> BlockError {
        match self {
            LayerError::Io { source, .. } => BlockError::io(context, source),
            other => BlockError::io(
                context,
                io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
            ),
        }
    }
}
