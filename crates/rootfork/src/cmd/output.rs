//! Output for people (aligned tables) and scripts (`--json`), and the JSON shape of each API
//! message (enum values as lower-case names).

use rootfork::api::v1::{self, Device, Event, Sandbox, Template};
use serde_json::{json, Value};

fn enum_name(full: &str, prefix: &str) -> String {
    full.trim_start_matches(prefix).to_ascii_lowercase()
}

/// A sandbox state's name.
pub fn state(s: i32) -> String {
    v1::SandboxState::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "SANDBOX_STATE_"))
        .unwrap_or_else(|_| s.to_string())
}

/// A health state's name.
pub fn health(s: i32) -> String {
    v1::HealthState::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "HEALTH_STATE_"))
        .unwrap_or_else(|_| s.to_string())
}

fn provider(s: i32) -> String {
    v1::ProviderKind::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "PROVIDER_KIND_"))
        .unwrap_or_else(|_| s.to_string())
}

fn format(s: i32) -> String {
    v1::TemplateFormat::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "TEMPLATE_FORMAT_"))
        .unwrap_or_else(|_| s.to_string())
}

fn event_kind(s: i32) -> String {
    v1::EventKind::try_from(s)
        .map(|s| enum_name(s.as_str_name(), "EVENT_KIND_"))
        .unwrap_or_else(|_| s.to_string())
}

/// A sandbox as JSON.
pub fn sandbox_json(s: &Sandbox) -> Value {
    json!({
        "id": s.id, "template": s.template, "provider": provider(s.provider),
        "state": state(s.state), "health": health(s.health),
        "nbd_uri": s.nbd_uri, "device_path": s.device_path,
        "created_unix_ms": s.created_unix_ms, "state_since_unix_ms": s.state_since_unix_ms,
        "message": s.message, "create_to_ready_us": s.create_to_ready_us,
        "overlay_bytes_written": s.overlay_bytes_written, "overlay_data_blocks": s.overlay_data_blocks,
        "paused_diff_bytes": s.paused_diff_bytes, "pause_count": s.pause_count,
        "recoveries": s.recoveries,
        "disk_size_bytes": s.disk_size_bytes, "quota_bytes": s.quota_bytes,
        "vm_pid": s.vm_pid, "vm_console": s.vm_console, "vm_state_bytes": s.vm_state_bytes,
        "vm_generation_id": s.vm_generation_id, "store_status": s.store_status,
        "vmm": s.vmm.as_ref().map(|v| json!({
            "kind": v1::vmm_settings::Kind::try_from(v.kind).map(|k| enum_name(k.as_str_name(), "KIND_")).unwrap_or_default(),
            "kernel": v.kernel, "initrd": v.initrd, "kernel_args": v.kernel_args,
            "memory_mib": v.memory_mib, "vcpus": v.vcpus,
        })),
    })
}

/// A template as JSON.
pub fn template_json(t: &Template) -> Value {
    json!({
        "name": t.name, "size_bytes": t.size_bytes, "format": format(t.format),
        "allocated_bytes": t.allocated_bytes, "created_unix_ms": t.created_unix_ms,
        "sandboxes": t.sandboxes, "path": t.path,
    })
}

/// A device as JSON.
pub fn device_json(d: &Device) -> Value {
    json!({
        "index": d.index, "path": d.path, "state": d.state, "sandbox": d.sandbox,
        "backend": d.backend, "since_unix_ms": d.since_unix_ms, "owner_pid": d.owner_pid,
    })
}

/// An event as JSON.
pub fn event_json(e: &Event) -> Value {
    json!({
        "seq": e.seq, "unix_ms": e.unix_ms, "kind": event_kind(e.kind), "sandbox": e.sandbox,
        "template": e.template, "device_index": e.device_index,
        "sandbox_state": state(e.sandbox_state), "health": health(e.health), "message": e.message,
    })
}

/// An event as one line for people.
pub fn event_line(e: &Event) -> String {
    let mut parts = vec![format!("#{}", e.seq), event_kind(e.kind)];
    if !e.sandbox.is_empty() {
        parts.push(format!("sandbox={}", e.sandbox));
    }
    if !e.template.is_empty() {
        parts.push(format!("template={}", e.template));
    }
    if let Some(i) = e.device_index {
        parts.push(format!("device=nbd{i}"));
    }
    if e.sandbox_state != 0 {
        parts.push(format!("state={}", state(e.sandbox_state)));
    }
    if e.health != 0 {
        parts.push(format!("health={}", health(e.health)));
    }
    if !e.message.is_empty() {
        parts.push(e.message.clone());
    }
    parts.join(" ")
}

/// Prints JSON.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as a table with a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let s: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c
                } else {
                    format!("{c:<width$}", width = w[i])
                }
            })
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Bytes for people.
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Age of a Unix-ms timestamp for people.
pub fn age(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = (rootfork::events::now_unix_ms() - unix_ms).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// The sandbox's disk for people: the NBD URI or the device path.
pub fn disk(s: &Sandbox) -> String {
    if !s.nbd_uri.is_empty() {
        s.nbd_uri.clone()
    } else if !s.device_path.is_empty() {
        s.device_path.clone()
    } else {
        "-".into()
    }
}
