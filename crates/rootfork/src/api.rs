//! The generated gRPC types and services of `proto/rootfork/v1/rootfork.proto`.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("rootfork.v1");
}
