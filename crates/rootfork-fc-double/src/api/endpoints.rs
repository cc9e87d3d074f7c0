//! The endpoints of Firecracker's API: method, path, operation id, and the definition of the
//! body where there is one.

use crate::builder::{endpoint, Endpoint, GET, PATCH, PUT};

/// Every endpoint, grouped as Firecracker's API documentation groups them.
pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        // Instance information and actions.
        endpoint(GET, "/", "describeInstance"),
        endpoint(GET, "/version", "getFirecrackerVersion"),
        endpoint(PUT, "/actions", "createSyncAction").body("InstanceActionInfo"),
        // Balloon device.
        endpoint(GET, "/balloon", "describeBalloonConfig"),
        endpoint(PUT, "/balloon", "putBalloon").body("Balloon"),
        endpoint(PATCH, "/balloon", "patchBalloon").body("BalloonUpdate"),
        endpoint(GET, "/balloon/statistics", "describeBalloonStats"),
        endpoint(PATCH, "/balloon/statistics", "patchBalloonStatsInterval")
            .body("BalloonStatsUpdate"),
        endpoint(PATCH, "/balloon/hinting/start", "startBalloonHinting")
            .optional_body("BalloonStartCmd"),
        endpoint(GET, "/balloon/hinting/status", "describeBalloonHinting"),
        endpoint(PATCH, "/balloon/hinting/stop", "stopBalloonHinting"),
        // Boot, CPU and machine configuration.
        endpoint(PUT, "/boot-source", "putGuestBootSource").body("BootSource"),
        endpoint(PUT, "/cpu-config", "putCpuConfiguration").optional_body("CpuConfig"),
        endpoint(GET, "/machine-config", "getMachineConfiguration"),
        endpoint(PUT, "/machine-config", "putMachineConfiguration")
            .optional_body("MachineConfiguration"),
        endpoint(PATCH, "/machine-config", "patchMachineConfiguration")
            .optional_body("MachineConfiguration"),
        // Block and persistent-memory devices.
        endpoint(PUT, "/drives/{drive_id}", "putGuestDriveByID").body("Drive"),
        endpoint(PATCH, "/drives/{drive_id}", "patchGuestDriveByID").body("PartialDrive"),
        endpoint(PUT, "/pmem/{id}", "putGuestPmemByID").body("Pmem"),
        endpoint(PATCH, "/pmem/{id}", "patchGuestPmemByID").body("PartialPmem"),
        // Logging and metrics.
        endpoint(PUT, "/logger", "putLogger").body("Logger"),
        endpoint(PUT, "/metrics", "putMetrics").body("Metrics"),
        // Microvm metadata service.
        endpoint(PUT, "/mmds", "putMmds").optional_body("MmdsContentsObject"),
        endpoint(PATCH, "/mmds", "patchMmds").optional_body("MmdsContentsObject"),
        endpoint(GET, "/mmds", "getMmds"),
        endpoint(PUT, "/mmds/config", "putMmdsConfig").body("MmdsConfig"),
        // Other devices.
        endpoint(PUT, "/entropy", "putEntropyDevice").body("EntropyDevice"),
        endpoint(PUT, "/serial", "putSerialDevice").body("SerialDevice"),
        endpoint(PUT, "/vsock", "putGuestVsock").body("Vsock"),
        // Memory hotplug.
        endpoint(PUT, "/hotplug/memory", "putMemoryHotplug").body("MemoryHotplugConfig"),
        endpoint(PATCH, "/hotplug/memory", "patchMemoryHotplug").body("MemoryHotplugSizeUpdate"),
        endpoint(GET, "/hotplug/memory", "getMemoryHotplug"),
        // Network interfaces.
        endpoint(
            PUT,
            "/network-interfaces/{iface_id}",
            "putGuestNetworkInterfaceByID",
        )
        .body("NetworkInterface"),
        endpoint(
            PATCH,
            "/network-interfaces/{iface_id}",
            "patchGuestNetworkInterfaceByID",
        )
        .body("PartialNetworkInterface"),
        // Snapshots and the VM state.
        endpoint(PUT, "/snapshot/create", "createSnapshot").body("SnapshotCreateParams"),
        endpoint(PUT, "/snapshot/load", "loadSnapshot").body("SnapshotLoadParams"),
        endpoint(PATCH, "/vm", "patchVm").body("Vm"),
        endpoint(GET, "/vm/config", "getExportVmConfig"),
    ]
}
