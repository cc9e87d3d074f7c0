//! A Firecracker API double for rootfork's tests (no Firecracker binary can be installed on CI
//! hosts). This is a development crate: nothing that ships depends on it.
//!
//! It serves the API on a Unix socket ([`serve`]) and validates every request against a
//! description of Firecracker's API ([`Spec`], [`validate()`]): path and method exist, the body
//! is JSON, required fields present, no unknown fields, types, enums and bounds match, through
//! `$ref`s. Refusals are `400 {"fault_message": ...}` like Firecracker's. The description is
//! rootfork's own ([`description()`], Firecracker [`API_VERSION`], written with [`builder`]) unless
//! a full Swagger document is loaded instead ([`Spec::load`]); [`compare()`] cross-checks the two.
//!
//! Valid requests go to a model of the VMM ([`DoubleState`]) that enforces Firecracker's ordering
//! rules and opens `path_on_host` as Firecracker does (read-write unless read-only, following
//! symlinks, size by seeking to the end), keeping the descriptor open so that `/proc/<pid>/fd`
//! shows it. What it opened is reported on a side channel ([`Reporter`]), never through an extra
//! API endpoint.
//!
//! Tests of other crates start the binary found by [`binary_path`].

pub mod api;
mod binary;
pub mod builder;
mod compare;
mod double;
mod report;
mod server;
mod spec;
mod state;
mod swagger;
mod validate;

pub use api::{description, API_VERSION};
pub use binary::{binary_path, BinaryError, BINARY_NAME};
pub use compare::{compare, Disagreement};
pub use double::{Answer, Double, MAX_BODY};
pub use report::{read_report, Reporter};
pub use server::serve;
pub use spec::{Additional, Operation, Parameter, PathItem, Schema, Spec};
pub use state::{
    is_double_snapshot, DoubleState, Phase, Reply, MODELLED_OPERATIONS, SNAPSHOT_MAGIC,
};
pub use swagger::{external_spec_path, SpecError, SPEC_ENV};
pub use validate::validate;
