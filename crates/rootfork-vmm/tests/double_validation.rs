//! The double refuses what Firecracker's API forbids (unknown paths and methods, non-JSON
//! bodies, missing required fields, unknown fields, wrong types, bad enums, nested `$ref`
//! violations) with `400 {"fault_message": ...}`, enforces Firecracker's ordering rules, and
//! every model this crate sends validates against the API description (the built-in one, and
//! also the Swagger document `$ROOTFORK_FC_SPEC` names when it is set).

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use rootfork_fc_double::{validate, Spec};
use rootfork_vmm::firecracker::models::*;
use rootfork_vmm::firecracker::{
    root_drive_body, ApiError, FirecrackerClient, RootDriveOptions, VmmCommand, VmmProcess,
};
use rootfork_vmm::{DevicePath, DriveAccess, ReadyDevice, RootDrive, StableDrivePath};
use serde::Serialize;

struct Running {
    _proc: VmmProcess,
    client: FirecrackerClient,
    _dir: tempfile::TempDir,
    dir_path: std::path::PathBuf,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cmd = VmmCommand::new(double_binary())
        .arg("--api-sock")
        .arg(&sock)
        .arg("--report")
        .arg(dir.path().join("report.jsonl"));
    let mut proc = VmmProcess::spawn(&cmd, None, &dir.path().join("log")).unwrap();
    proc.wait_for_socket(&sock, Duration::from_secs(5))
        .await
        .unwrap();
    Running {
        _proc: proc,
        client: FirecrackerClient::new(&sock),
        dir_path: dir.path().to_owned(),
        _dir: dir,
    }
}

async fn fault(c: &FirecrackerClient, method: Method, path: &str, body: &str) -> String {
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    match c.raw(method.clone(), path, body).await {
        Err(ApiError::Api {
            status: 400,
            fault_message,
            ..
        }) => fault_message,
        other => panic!("{method} {path}: expected a 400, got {other:?}"),
    }
}

#[tokio::test]
async fn requests_outside_the_spec_are_refused_with_a_fault_message() {
    let r = start().await;
    let c = &r.client;
    let cases: &[(Method, &str, &str, &str)] = &[
        (
            Method::GET,
            "/no-such-path",
            "",
            "Invalid request method and/or path",
        ),
        (
            Method::DELETE,
            "/boot-source",
            "",
            "Invalid request method and/or path",
        ),
        (
            Method::GET,
            "/boot-source",
            "",
            "Invalid request method and/or path",
        ),
        (
            Method::PUT,
            "/drives",
            "{}",
            "Invalid request method and/or path",
        ),
        (Method::PUT, "/boot-source", "", "requires a JSON body"),
        (
            Method::PUT,
            "/boot-source",
            "{not json",
            "deserializing the json body",
        ),
        (Method::GET, "/", "{}", "does not take a request body"),
        (
            Method::PUT,
            "/boot-source",
            r#"{"boot_args": "x"}"#,
            "missing field `kernel_image_path`",
        ),
        (
            Method::PUT,
            "/boot-source",
            r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#,
            "unknown field `kernel_args`",
        ),
        (
            Method::PUT,
            "/boot-source",
            r#"{"kernel_image_path": 7}"#,
            "body.kernel_image_path: invalid type: expected string, found integer",
        ),
        (
            Method::PUT,
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_root_device": "yes", "path_on_host": "/x"}"#,
            "body.is_root_device: invalid type: expected boolean",
        ),
        (
            Method::PUT,
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_root_device": true, "path_on_host": null}"#,
            "found null",
        ),
        (
            Method::PUT,
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_root_device": true, "cache_type": "Fast"}"#,
            "unknown variant",
        ),
        (
            Method::PUT,
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "is_root_device": true,
                "rate_limiter": {"bandwidth": {"refill_time": 100}}}"#,
            "body.rate_limiter.bandwidth: missing field `size`",
        ),
        (
            Method::PUT,
            "/machine-config",
            r#"{"vcpu_count": 33, "mem_size_mib": 128}"#,
            "above the maximum",
        ),
        (
            Method::PUT,
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 12.5}"#,
            "expected integer",
        ),
        (
            Method::PUT,
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "unknown variant",
        ),
        (
            Method::PATCH,
            "/vm",
            r#"{"state": "Running"}"#,
            "unknown variant",
        ),
        (
            Method::PUT,
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}}"#,
            "body.mem_backend: missing field `backend_path`",
        ),
    ];
    for (method, path, body, want) in cases {
        let msg = fault(c, method.clone(), path, body).await;
        assert!(
            msg.contains(want),
            "{method} {path} {body}: {msg:?} lacks {want:?}"
        );
    }
    // The refusals changed nothing.
    assert_eq!(
        c.describe_instance().await.unwrap().state,
        InstanceState::NotStarted
    );
}

#[tokio::test]
async fn firecracker_ordering_rules_are_enforced() {
    let r = start().await;
    let c = &r.client;
    // No kernel, no root drive: cannot start.
    let e = c.instance_start().await.unwrap_err();
    assert!(e.fault_message().unwrap().contains("kernel"), "{e}");
    // Post-boot only calls before boot.
    let e = c.pause().await.unwrap_err();
    assert!(
        e.fault_message().unwrap().contains("before starting"),
        "{e}"
    );
    // Ids in the URL and the body must agree.
    let e = c
        .raw(
            Method::PUT,
            "/drives/a",
            Some(
                br#"{"drive_id": "b", "is_root_device": false, "path_on_host": "/dev/null"}"#
                    .to_vec(),
            ),
        )
        .await
        .unwrap_err();
    assert!(e.fault_message().unwrap().contains("does not match"), "{e}");
    // A missing kernel file is refused like Firecracker does.
    let e = c
        .put_boot_source(&BootSource {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.fault_message().unwrap().contains("kernel"), "{e}");
    // A drive that cannot be opened is refused.
    let e = c
        .put_drive(&Drive {
            drive_id: "data".into(),
            is_root_device: false,
            path_on_host: Some("/nonexistent/disk".into()),
            is_read_only: Some(false),
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        })
        .await
        .unwrap_err();
    assert!(
        e.fault_message().unwrap().contains("/nonexistent/disk"),
        "{e}"
    );
    // Once something boot-specific is configured, a snapshot can no longer be loaded.
    c.put_machine_config(&MachineConfiguration {
        vcpu_count: 1,
        mem_size_mib: 64,
        smt: None,
        track_dirty_pages: None,
        huge_pages: None,
        cpu_template: None,
    })
    .await
    .unwrap();
    let e = c
        .load_snapshot(&rootfork_vmm::firecracker::ResumeConfig::from_files("/s", "/m").load)
        .await
        .unwrap_err();
    assert!(e.fault_message().unwrap().contains("not allowed"), "{e}");
    // MMDS round trip (PUT, PATCH as merge patch, GET).
    c.put_mmds(&serde_json::json!({"a": {"b": 1, "c": 2}}))
        .await
        .unwrap();
    c.patch_mmds(&serde_json::json!({"a": {"c": null, "d": "x"}}))
        .await
        .unwrap();
    assert_eq!(
        c.get_mmds().await.unwrap(),
        serde_json::json!({"a": {"b": 1, "d": "x"}})
    );
    assert_eq!(c.get_machine_config().await.unwrap().mem_size_mib, 64);
    // The double reports the API version it validates against.
    let version = c.version().await.unwrap().firecracker_version;
    assert_eq!(version, format!("{}-rootfork-fc-double", served_version()));
    let info = c.describe_instance().await.unwrap();
    assert_eq!(info.vmm_version, version);
    let _ = &r.dir_path;
}

#[tokio::test]
async fn post_boot_calls_metrics_logger_and_drive_patch() {
    let r = start().await;
    let c = &r.client;
    let d = &r.dir_path;
    let log = d.join("fc.log");
    let metrics = d.join("fc.metrics");
    std::fs::write(&log, b"").unwrap();
    std::fs::write(&metrics, b"").unwrap();
    c.put_logger(&Logger {
        log_path: Some(log.to_string_lossy().into()),
        level: Some(LogLevel::Debug),
        show_level: Some(true),
        show_log_origin: Some(false),
        module: None,
    })
    .await
    .unwrap();
    c.put_metrics(&Metrics {
        metrics_path: metrics.to_string_lossy().into(),
        emit_id: Some(true),
    })
    .await
    .unwrap();
    let disk1 = d.join("disk1");
    let disk2 = d.join("disk2");
    std::fs::write(&disk1, vec![0u8; 4096]).unwrap();
    std::fs::write(&disk2, vec![0u8; 8192]).unwrap();
    std::fs::write(d.join("vmlinux"), b"k").unwrap();
    c.put_boot_source(&BootSource {
        kernel_image_path: d.join("vmlinux").to_string_lossy().into(),
        boot_args: Some("console=ttyS0".into()),
        initrd_path: None,
    })
    .await
    .unwrap();
    let dev = ReadyDevice::verify(DevicePath::new(&disk1)).unwrap();
    let root = RootDrive::new(&dev, StableDrivePath::new(&disk1).unwrap());
    c.put_root_drive(&root, &RootDriveOptions::default())
        .await
        .unwrap();
    c.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
        guest_mac: Some("06:00:ac:10:00:02".into()),
        mtu: Some(1500),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .await
    .unwrap();
    c.put_mmds_config(&MmdsConfig {
        network_interfaces: vec!["eth0".into()],
        version: Some(MmdsVersion::V2),
        ipv4_address: None,
    })
    .await
    .unwrap();
    // PATCH before boot is refused.
    let patch = PartialDrive {
        drive_id: "rootfs".into(),
        path_on_host: Some(disk2.to_string_lossy().into()),
        rate_limiter: None,
    };
    assert!(c.patch_drive(&patch).await.is_err());
    c.instance_start().await.unwrap();
    // Pre-boot only calls after boot are refused.
    let e = c
        .put_root_drive(&root, &RootDriveOptions::default())
        .await
        .unwrap_err();
    assert!(e.fault_message().unwrap().contains("after starting"), "{e}");
    c.patch_drive(&patch).await.unwrap();
    c.patch_network_interface(&PartialNetworkInterface {
        iface_id: "eth0".into(),
        rx_rate_limiter: Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1 << 20,
                refill_time: 100,
                one_time_burst: None,
            }),
            ops: None,
        }),
        tx_rate_limiter: None,
    })
    .await
    .unwrap();
    c.flush_metrics().await.unwrap();
    c.send_ctrl_alt_del().await.unwrap();
    assert!(!std::fs::read_to_string(&metrics).unwrap().is_empty());
    assert!(std::fs::read_to_string(&log).unwrap().contains("logger"));
    let events = report(&d.join("report.jsonl"));
    let patched = opens(&events)
        .into_iter()
        .find(|e| e["purpose"] == "drive_patch")
        .unwrap();
    assert_eq!(patched["size"], 8192);
}

fn check_model<T: Serialize>(spec: &Spec, definition: &str, value: &T) {
    let v = serde_json::to_value(value).unwrap();
    validate(spec, &spec.definitions[definition], &v)
        .unwrap_or_else(|e| panic!("{definition}: {v} does not validate: {e}"));
}

#[test]
fn every_model_validates_against_the_spec() {
    for (name, spec) in specs() {
        println!("models against the {name} description");
        every_model_validates(&spec);
    }
}

fn every_model_validates(spec: &Spec) {
    let bucket = TokenBucket {
        size: 1000,
        refill_time: 100,
        one_time_burst: Some(10),
    };
    let limiter = RateLimiter {
        bandwidth: Some(bucket),
        ops: Some(bucket),
    };
    check_model(
        spec,
        "BootSource",
        &BootSource {
            kernel_image_path: "/k".into(),
            boot_args: Some("a".into()),
            initrd_path: Some("/i".into()),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk");
    std::fs::write(&f, b"x").unwrap();
    let dev = ReadyDevice::verify(DevicePath::new(&f)).unwrap();
    let root = RootDrive::new(&dev, StableDrivePath::new("/fc-vm/rootfs.ext4").unwrap())
        .with_access(DriveAccess::ReadOnly);
    let body = root_drive_body(
        &root,
        &RootDriveOptions {
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Async),
            rate_limiter: Some(limiter),
            partuuid: Some("abcd".into()),
        },
    );
    assert_eq!(body.path_on_host.as_deref(), Some("/fc-vm/rootfs.ext4"));
    assert_eq!(body.is_read_only, Some(true));
    check_model(spec, "Drive", &body);
    check_model(
        spec,
        "PartialDrive",
        &PartialDrive {
            drive_id: "rootfs".into(),
            path_on_host: Some("/p".into()),
            rate_limiter: Some(limiter),
        },
    );
    check_model(
        spec,
        "MachineConfiguration",
        &MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: Some(false),
            track_dirty_pages: Some(true),
            huge_pages: Some(HugePages::Hugetlbfs2M),
            cpu_template: Some("None".into()),
        },
    );
    check_model(
        spec,
        "NetworkInterface",
        &NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:00:00:00:01".into()),
            mtu: Some(9000),
            rx_rate_limiter: Some(limiter),
            tx_rate_limiter: Some(limiter),
        },
    );
    check_model(
        spec,
        "PartialNetworkInterface",
        &PartialNetworkInterface {
            iface_id: "eth0".into(),
            rx_rate_limiter: Some(limiter),
            tx_rate_limiter: None,
        },
    );
    for action_type in [
        ActionType::InstanceStart,
        ActionType::SendCtrlAltDel,
        ActionType::FlushMetrics,
    ] {
        check_model(
            spec,
            "InstanceActionInfo",
            &InstanceActionInfo { action_type },
        );
    }
    check_model(
        spec,
        "SnapshotCreateParams",
        &SnapshotCreateParams {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
            snapshot_type: Some(SnapshotType::Diff),
        },
    );
    check_model(
        spec,
        "SnapshotLoadParams",
        &SnapshotLoadParams {
            snapshot_path: "/s".into(),
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/u".into(),
            }),
            mem_file_path: None,
            track_dirty_pages: Some(true),
            resume_vm: Some(false),
            network_overrides: Some(vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }]),
        },
    );
    for state in [VmState::Paused, VmState::Resumed] {
        check_model(spec, "Vm", &Vm { state });
    }
    check_model(
        spec,
        "Logger",
        &Logger {
            log_path: Some("/l".into()),
            level: Some(LogLevel::Trace),
            show_level: Some(true),
            show_log_origin: Some(true),
            module: Some("api_server".into()),
        },
    );
    check_model(
        spec,
        "Metrics",
        &Metrics {
            metrics_path: "/m".into(),
            emit_id: Some(true),
        },
    );
    check_model(
        spec,
        "MmdsConfig",
        &MmdsConfig {
            network_interfaces: vec!["eth0".into()],
            version: Some(MmdsVersion::V1),
            ipv4_address: Some("169.254.169.254".into()),
        },
    );
    check_model(
        spec,
        "InstanceInfo",
        &InstanceInfo {
            app_name: "Firecracker".into(),
            id: "x".into(),
            state: InstanceState::NotStarted,
            vmm_version: "1".into(),
        },
    );
    check_model(
        spec,
        "FirecrackerVersion",
        &FirecrackerVersion {
            firecracker_version: "1.0".into(),
        },
    );
}

#[test]
fn the_spec_has_every_operation_the_client_uses() {
    for (name, spec) in specs() {
        println!("client operations in the {name} description");
        has_every_client_operation(&spec);
    }
}

fn has_every_client_operation(spec: &Spec) {
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/version"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PATCH", "/drives/rootfs"),
        ("PUT", "/machine-config"),
        ("GET", "/machine-config"),
        ("PUT", "/network-interfaces/eth0"),
        ("PATCH", "/network-interfaces/eth0"),
        ("PUT", "/actions"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
        ("PATCH", "/vm"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/mmds"),
        ("PATCH", "/mmds"),
        ("GET", "/mmds"),
        ("PUT", "/mmds/config"),
    ] {
        let (item, _) = spec
            .find_path(path)
            .unwrap_or_else(|| panic!("{path} not in the spec"));
        assert!(item.operations.contains_key(method), "{method} {path}");
    }
    assert!(spec.find_path("/mmds/config").unwrap().0.template == "/mmds/config");
}
