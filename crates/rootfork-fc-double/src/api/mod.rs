//! rootfork's own description of Firecracker's HTTP API, written from Firecracker's published
//! API documentation as Rust data with the [`crate::builder`] DSL: every path and method, its
//! body definition, and every definition's properties, types, required fields, enums and bounds.
//! The double validates against it by default, so the repository tests on its own; a full
//! Swagger document can still be loaded instead ([`Spec::load`]), and the cross-check
//! ([`crate::compare()`], run when `$ROOTFORK_FC_SPEC` names one) keeps the two in agreement.

mod definitions;
mod endpoints;

use crate::builder::api;
use crate::spec::Spec;

/// The Firecracker API version this description describes.
pub const API_VERSION: &str = "1.17.0";

/// The built-in description of Firecracker's API, version [`API_VERSION`].
pub fn description() -> Spec {
    api(API_VERSION)
        .endpoints(endpoints::endpoints())
        .definitions(definitions::definitions())
        .build()
        // The description is constant data; the unit test below builds it on every test run.
        .expect("the built-in Firecracker API description is consistent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{GET, PATCH, PUT};

    #[test]
    fn the_description_builds_and_covers_what_rootfork_uses() {
        let spec = description();
        assert_eq!(spec.version, API_VERSION);
        for (method, path, operation) in [
            (GET, "/", "describeInstance"),
            (GET, "/version", "getFirecrackerVersion"),
            (PUT, "/boot-source", "putGuestBootSource"),
            (PUT, "/drives/rootfs", "putGuestDriveByID"),
            (PATCH, "/drives/rootfs", "patchGuestDriveByID"),
            (PUT, "/machine-config", "putMachineConfiguration"),
            (GET, "/machine-config", "getMachineConfiguration"),
            (
                PUT,
                "/network-interfaces/eth0",
                "putGuestNetworkInterfaceByID",
            ),
            (
                PATCH,
                "/network-interfaces/eth0",
                "patchGuestNetworkInterfaceByID",
            ),
            (PUT, "/actions", "createSyncAction"),
            (PUT, "/snapshot/create", "createSnapshot"),
            (PUT, "/snapshot/load", "loadSnapshot"),
            (PATCH, "/vm", "patchVm"),
            (PUT, "/logger", "putLogger"),
            (PUT, "/metrics", "putMetrics"),
            (PUT, "/mmds", "putMmds"),
            (PATCH, "/mmds", "patchMmds"),
            (GET, "/mmds", "getMmds"),
            (PUT, "/mmds/config", "putMmdsConfig"),
        ] {
            let (item, _) = spec.find_path(path).unwrap();
            assert_eq!(item.operations[method].operation_id, operation);
        }
        // Every operation the double's model handles is described.
        let described: Vec<&str> = spec
            .paths
            .iter()
            .flat_map(|p| p.operations.values().map(|o| o.operation_id.as_str()))
            .collect();
        for op in crate::state::MODELLED_OPERATIONS {
            assert!(described.contains(op), "{op} is not described");
        }
    }
}
