//! The definitions of Firecracker's API: the request and response bodies, property by property,
//! with their types, required fields, allowed values and bounds.

use crate::builder::{
    any_object, array, boolean, definition, int32, int64, integer, map_of, object, one_of,
    reference, string, Definition,
};

/// Largest value of an unsigned 32-bit field.
const U32_MAX: f64 = 4_294_967_295.0;

/// Every definition, grouped by the part of the API that uses it.
pub(super) fn definitions() -> Vec<Definition> {
    let mut all = Vec::new();
    all.extend(instance());
    all.extend(machine());
    all.extend(cpu());
    all.extend(devices());
    all.extend(balloon());
    all.extend(memory_hotplug());
    all.extend(observability());
    all.extend(mmds());
    all.extend(snapshots());
    all
}

/// Instance information, actions, errors and the exported configuration.
fn instance() -> Vec<Definition> {
    vec![
        object("InstanceInfo")
            .required("app_name", string())
            .required("id", string())
            .required("state", one_of(&["Not started", "Running", "Paused"]))
            .required("vmm_version", string()),
        object("FirecrackerVersion").required("firecracker_version", string()),
        object("InstanceActionInfo").required(
            "action_type",
            one_of(&["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]),
        ),
        object("Error").optional("fault_message", string()),
        object("FullVmConfiguration")
            .optional("balloon", reference("Balloon"))
            .optional("drives", array(reference("Drive")))
            .optional("boot-source", reference("BootSource"))
            .optional("cpu-config", reference("CpuConfig"))
            .optional("logger", reference("Logger"))
            .optional("machine-config", reference("MachineConfiguration"))
            .optional("metrics", reference("Metrics"))
            .optional("memory-hotplug", reference("MemoryHotplugConfig"))
            .optional("mmds-config", reference("MmdsConfig"))
            .optional("network-interfaces", array(reference("NetworkInterface")))
            .optional("pmem", array(reference("Pmem")))
            .optional("vsock", reference("Vsock"))
            .optional("entropy", reference("EntropyDevice")),
    ]
}

/// The boot source and the machine configuration.
fn machine() -> Vec<Definition> {
    vec![
        object("BootSource")
            .required("kernel_image_path", string())
            .optional("boot_args", string())
            .optional("initrd_path", string()),
        object("MachineConfiguration")
            .required("vcpu_count", integer().at_least(1.0).at_most(32.0))
            .required("mem_size_mib", integer())
            .optional("smt", boolean())
            .optional("track_dirty_pages", boolean())
            .optional("cpu_template", reference("CpuTemplate"))
            .optional("huge_pages", one_of(&["None", "Transparent", "2M"])),
        object("Vm").required("state", one_of(&["Paused", "Resumed"])),
    ]
}

/// CPU templates and custom CPU configuration.
fn cpu() -> Vec<Definition> {
    vec![
        definition(
            "CpuTemplate",
            one_of(&["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]),
        ),
        object("CpuConfig")
            .optional("kvm_capabilities", array(string()))
            .optional("cpuid_modifiers", array(reference("CpuidLeafModifier")))
            .optional("msr_modifiers", array(reference("MsrModifier")))
            .optional("reg_modifiers", array(reference("ArmRegisterModifier")))
            .optional("vcpu_features", array(reference("VcpuFeatures"))),
        object("CpuidLeafModifier")
            .required("leaf", string())
            .required("subleaf", string())
            .required("flags", int32())
            .required("modifiers", array(reference("CpuidRegisterModifier"))),
        object("CpuidRegisterModifier")
            .required("register", one_of(&["eax", "ebx", "ecx", "edx"]))
            .required("bitmap", string()),
        object("MsrModifier")
            .required("addr", string())
            .required("bitmap", string()),
        object("ArmRegisterModifier")
            .required("addr", string())
            .required("bitmap", string()),
        object("VcpuFeatures")
            .required("index", int32())
            .required("bitmap", string()),
    ]
}

/// Block, pmem, network, vsock, entropy and serial devices, and their rate limiters.
fn devices() -> Vec<Definition> {
    vec![
        object("Drive")
            .required("drive_id", string())
            .required("is_root_device", boolean())
            .optional("partuuid", string())
            .optional("cache_type", one_of(&["Unsafe", "Writeback"]))
            .optional("is_read_only", boolean())
            .optional("path_on_host", string())
            .optional("rate_limiter", reference("RateLimiter"))
            .optional("io_engine", one_of(&["Sync", "Async"]))
            .optional("socket", string()),
        object("PartialDrive")
            .required("drive_id", string())
            .optional("path_on_host", string())
            .optional("rate_limiter", reference("RateLimiter")),
        object("Pmem")
            .required("id", string())
            .required("path_on_host", string())
            .optional("root_device", boolean())
            .optional("read_only", boolean())
            .optional("rate_limiter", reference("RateLimiter")),
        object("PartialPmem")
            .required("id", string())
            .optional("rate_limiter", reference("RateLimiter")),
        object("NetworkInterface")
            .required("iface_id", string())
            .required("host_dev_name", string())
            .optional("guest_mac", string())
            .optional("mtu", integer().at_least(68.0).at_most(65_535.0))
            .optional("rx_rate_limiter", reference("RateLimiter"))
            .optional("tx_rate_limiter", reference("RateLimiter")),
        object("PartialNetworkInterface")
            .required("iface_id", string())
            .optional("rx_rate_limiter", reference("RateLimiter"))
            .optional("tx_rate_limiter", reference("RateLimiter")),
        object("Vsock")
            .required("guest_cid", integer().at_least(3.0))
            .required("uds_path", string())
            .optional("vsock_id", string()),
        object("EntropyDevice").optional("rate_limiter", reference("RateLimiter")),
        object("SerialDevice")
            .optional("serial_out_path", string())
            .optional("rate_limiter", reference("TokenBucket")),
        object("RateLimiter")
            .optional("bandwidth", reference("TokenBucket"))
            .optional("ops", reference("TokenBucket")),
        object("TokenBucket")
            .required("size", int64().at_least(0.0))
            .required("refill_time", int64().at_least(0.0))
            .optional("one_time_burst", int64().at_least(0.0)),
    ]
}

/// The balloon device.
fn balloon() -> Vec<Definition> {
    let counter = int64;
    vec![
        object("Balloon")
            .required("amount_mib", integer())
            .required("deflate_on_oom", boolean())
            .optional("stats_polling_interval_s", integer())
            .optional("free_page_hinting", boolean())
            .optional("free_page_reporting", boolean()),
        object("BalloonUpdate").required("amount_mib", integer()),
        object("BalloonStatsUpdate").required("stats_polling_interval_s", integer()),
        object("BalloonStartCmd").optional("acknowledge_on_stop", boolean()),
        object("BalloonHintingStatus")
            .required("host_cmd", integer())
            .optional("guest_cmd", integer()),
        object("BalloonStats")
            .required("target_pages", integer())
            .required("actual_pages", integer())
            .required("target_mib", integer())
            .required("actual_mib", integer())
            .optional("swap_in", counter())
            .optional("swap_out", counter())
            .optional("major_faults", counter())
            .optional("minor_faults", counter())
            .optional("free_memory", counter())
            .optional("total_memory", counter())
            .optional("available_memory", counter())
            .optional("disk_caches", counter())
            .optional("hugetlb_allocations", counter())
            .optional("hugetlb_failures", counter())
            .optional("oom_kill", counter())
            .optional("alloc_stall", counter())
            .optional("async_scan", counter())
            .optional("direct_scan", counter())
            .optional("async_reclaim", counter())
            .optional("direct_reclaim", counter()),
    ]
}

/// Memory hotplug.
fn memory_hotplug() -> Vec<Definition> {
    vec![
        object("MemoryHotplugConfig")
            .optional("total_size_mib", integer().at_most(U32_MAX))
            .optional("slot_size_mib", integer().at_least(128.0).at_most(U32_MAX))
            .optional("block_size_mib", integer().at_least(2.0).at_most(U32_MAX)),
        object("MemoryHotplugSizeUpdate").optional(
            "requested_size_mib",
            integer().at_least(0.0).at_most(U32_MAX),
        ),
        object("MemoryHotplugStatus")
            .optional("total_size_mib", integer())
            .optional("slot_size_mib", integer())
            .optional("block_size_mib", integer())
            .optional("plugged_size_mib", integer())
            .optional("requested_size_mib", integer()),
    ]
}

/// The logger and the metrics.
fn observability() -> Vec<Definition> {
    vec![
        object("Logger")
            .optional(
                "level",
                one_of(&["Error", "Warning", "Info", "Debug", "Trace", "Off"]),
            )
            .optional("log_path", string())
            .optional("show_level", boolean())
            .optional("show_log_origin", boolean())
            .optional("module", string()),
        object("Metrics")
            .required("metrics_path", string())
            .optional("emit_id", boolean())
            .optional("properties", map_of(string())),
    ]
}

/// The microVM metadata service.
fn mmds() -> Vec<Definition> {
    vec![
        object("MmdsConfig")
            .required("network_interfaces", array(string()))
            .optional("version", one_of(&["V1", "V2"]))
            .optional("ipv4_address", string())
            .optional("imds_compat", boolean()),
        definition("MmdsContentsObject", any_object()),
    ]
}

/// Snapshot creation and loading.
fn snapshots() -> Vec<Definition> {
    vec![
        object("SnapshotCreateParams")
            .required("snapshot_path", string())
            .required("mem_file_path", string())
            .optional("snapshot_type", one_of(&["Full", "Diff"])),
        object("SnapshotLoadParams")
            .required("snapshot_path", string())
            .optional("mem_file_path", string())
            .optional("mem_backend", reference("MemoryBackend"))
            .optional("enable_diff_snapshots", boolean())
            .optional("track_dirty_pages", boolean())
            .optional("resume_vm", boolean())
            .optional("network_overrides", array(reference("NetworkOverride")))
            .optional("vsock_override", reference("VsockOverride"))
            .optional("clock_realtime", boolean())
            .optional(
                "huge_pages",
                one_of(&["Snapshot", "None", "Transparent", "2M"]),
            ),
        object("MemoryBackend")
            .required("backend_type", one_of(&["File", "Uffd"]))
            .required("backend_path", string()),
        object("NetworkOverride")
            .required("iface_id", string())
            .required("host_dev_name", string()),
        object("VsockOverride").required("uds_path", string()),
    ]
}
