//! Wire ↔ daemon: the only place that maps proto messages to the daemon's own types and back.
//! Requests become validated specs (`TryFrom`), views become messages (`From`).

use std::path::PathBuf;

use rootfork_provider::ProviderKind;

use crate::api::v1;
use crate::daemon::model::{
    DeviceList, Health, SandboxInfo, SandboxState, TemplateFormat, TemplateInfo,
};
use crate::daemon::spec::{SandboxSpec, SpecError, VmSpec, VmmKind};
use crate::events::{Event, EventKind};

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn non_zero(n: u32) -> Option<u32> {
    (n != 0).then_some(n)
}

fn provider_kind(k: i32) -> Result<ProviderKind, SpecError> {
    match v1::ProviderKind::try_from(k) {
        Ok(v1::ProviderKind::Unspecified | v1::ProviderKind::Socket) => Ok(ProviderKind::Socket),
        Ok(v1::ProviderKind::Kernel) => Ok(ProviderKind::Kernel),
        Err(_) => Err(SpecError::UnknownProviderKind(k)),
    }
}

impl TryFrom<&v1::VmmSettings> for VmSpec {
    type Error = SpecError;

    fn try_from(v: &v1::VmmSettings) -> Result<VmSpec, SpecError> {
        use v1::vmm_settings::Kind;
        let kind = match Kind::try_from(v.kind) {
            Ok(Kind::Unspecified) => VmmKind::Unspecified,
            Ok(Kind::Qemu) => VmmKind::Qemu,
            Ok(Kind::Firecracker) => VmmKind::Firecracker,
            Err(_) => return Err(SpecError::UnknownVmmKind(v.kind)),
        };
        VmSpec {
            kind,
            kernel: non_empty(&v.kernel).map(PathBuf::from),
            initrd: non_empty(&v.initrd).map(PathBuf::from),
            kernel_args: non_empty(&v.kernel_args),
            memory_mib: non_zero(v.memory_mib),
            vcpus: non_zero(v.vcpus),
        }
        .validated()
    }
}

impl TryFrom<&v1::CreateSandboxRequest> for SandboxSpec {
    type Error = SpecError;

    fn try_from(r: &v1::CreateSandboxRequest) -> Result<SandboxSpec, SpecError> {
        SandboxSpec {
            template: r.template.clone(),
            id: non_empty(&r.id),
            provider: provider_kind(r.provider)?,
            vm: r.vmm.as_ref().map(VmSpec::try_from).transpose()?,
            disk_size: (r.disk_size_bytes != 0).then_some(r.disk_size_bytes),
            quota: (r.quota_bytes != 0).then_some(r.quota_bytes),
        }
        .validated()
    }
}

impl From<&VmSpec> for v1::VmmSettings {
    fn from(v: &VmSpec) -> Self {
        use v1::vmm_settings::Kind;
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        v1::VmmSettings {
            kind: match v.kind {
                VmmKind::Unspecified => Kind::Unspecified,
                VmmKind::Qemu => Kind::Qemu,
                VmmKind::Firecracker => Kind::Firecracker,
            } as i32,
            kernel: path(&v.kernel),
            initrd: path(&v.initrd),
            kernel_args: v.kernel_args.clone().unwrap_or_default(),
            memory_mib: v.memory_mib.unwrap_or(0),
            vcpus: v.vcpus.unwrap_or(0),
        }
    }
}

impl From<SandboxState> for v1::SandboxState {
    fn from(s: SandboxState) -> Self {
        match s {
            SandboxState::Creating => v1::SandboxState::Creating,
            SandboxState::Running => v1::SandboxState::Running,
            SandboxState::Pausing => v1::SandboxState::Pausing,
            SandboxState::Paused => v1::SandboxState::Paused,
            SandboxState::Resuming => v1::SandboxState::Resuming,
            SandboxState::Failed => v1::SandboxState::Failed,
            SandboxState::Deleting => v1::SandboxState::Deleting,
            SandboxState::Deleted => v1::SandboxState::Deleted,
        }
    }
}

impl From<Health> for v1::HealthState {
    fn from(h: Health) -> Self {
        match h {
            Health::Unknown => v1::HealthState::Unspecified,
            Health::Healthy => v1::HealthState::Healthy,
            Health::Degraded => v1::HealthState::Degraded,
            Health::Failed => v1::HealthState::Failed,
        }
    }
}

fn provider_proto(k: ProviderKind) -> v1::ProviderKind {
    match k {
        ProviderKind::Kernel => v1::ProviderKind::Kernel,
        _ => v1::ProviderKind::Socket,
    }
}

impl From<SandboxInfo> for v1::Sandbox {
    fn from(i: SandboxInfo) -> Self {
        let s = i.status;
        v1::Sandbox {
            id: i.id,
            template: i.template,
            provider: provider_proto(i.provider) as i32,
            state: v1::SandboxState::from(s.state) as i32,
            nbd_uri: s.nbd_uri,
            device_path: s.device_path,
            created_unix_ms: i.created_unix_ms,
            state_since_unix_ms: s.since_unix_ms,
            health: v1::HealthState::from(s.health) as i32,
            message: s.message,
            vmm: i.vm.as_ref().map(v1::VmmSettings::from),
            create_to_ready_us: s.ready_latency.as_micros() as u64,
            overlay_bytes_written: i.overlay_bytes_written,
            overlay_data_blocks: i.overlay_data_blocks,
            paused_diff_bytes: s.paused_diff_bytes,
            pause_count: s.pause_count,
            vm_pid: s.vm_pid,
            vm_console: s.vm_console,
            recoveries: s.recoveries,
            disk_size_bytes: i.disk_size,
            quota_bytes: i.quota.unwrap_or(0),
            vm_state_bytes: s.vm_state_bytes,
            vm_generation_id: s.vm_generation_id,
            store_status: s.store_status,
        }
    }
}

impl From<TemplateInfo> for v1::Template {
    fn from(t: TemplateInfo) -> Self {
        v1::Template {
            name: t.name,
            size_bytes: t.size_bytes,
            format: match t.format {
                TemplateFormat::Raw => v1::TemplateFormat::Raw,
                TemplateFormat::Ext4 => v1::TemplateFormat::Ext4,
            } as i32,
            allocated_bytes: t.allocated_bytes,
            created_unix_ms: t.created_unix_ms,
            sandboxes: t.sandboxes,
            path: t.path.display().to_string(),
        }
    }
}

impl From<DeviceList> for v1::ListDevicesResponse {
    fn from(l: DeviceList) -> Self {
        match l {
            DeviceList::Unavailable(reason) => v1::ListDevicesResponse {
                available: false,
                reason,
                devices: vec![],
            },
            DeviceList::Available(devices) => v1::ListDevicesResponse {
                available: true,
                reason: String::new(),
                devices: devices
                    .into_iter()
                    .map(|d| v1::Device {
                        index: d.index,
                        path: d.path.display().to_string(),
                        state: d.state,
                        sandbox: d.sandbox.unwrap_or_default(),
                        backend: d.backend.unwrap_or_default(),
                        since_unix_ms: d.since_unix_ms,
                        owner_pid: d.owner_pid.unwrap_or(0),
                    })
                    .collect(),
            },
        }
    }
}

impl From<EventKind> for v1::EventKind {
    fn from(k: EventKind) -> Self {
        match k {
            EventKind::Claimed => v1::EventKind::Claimed,
            EventKind::Connected => v1::EventKind::Connected,
            EventKind::Disconnected => v1::EventKind::Disconnected,
            EventKind::Released => v1::EventKind::Released,
            EventKind::Reclaimed => v1::EventKind::Reclaimed,
            EventKind::Health => v1::EventKind::Health,
            EventKind::Sandbox => v1::EventKind::Sandbox,
            EventKind::Template => v1::EventKind::Template,
            EventKind::Error => v1::EventKind::Error,
        }
    }
}

impl From<Event> for v1::Event {
    fn from(e: Event) -> Self {
        v1::Event {
            seq: e.seq,
            unix_ms: e.unix_ms,
            kind: v1::EventKind::from(e.kind) as i32,
            sandbox: e.sandbox,
            template: e.template,
            device_index: e.device_index,
            sandbox_state: e
                .state
                .map_or(v1::SandboxState::Unspecified, v1::SandboxState::from)
                as i32,
            health: e
                .health
                .map_or(v1::HealthState::Unspecified, v1::HealthState::from)
                as i32,
            message: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm(kind: v1::vmm_settings::Kind) -> v1::VmmSettings {
        v1::VmmSettings {
            kind: kind as i32,
            kernel: "/k".into(),
            initrd: String::new(),
            kernel_args: "console=ttyS0".into(),
            memory_mib: 128,
            vcpus: 0,
        }
    }

    #[test]
    fn vmm_settings_round_trip() {
        for kind in [
            v1::vmm_settings::Kind::Unspecified,
            v1::vmm_settings::Kind::Qemu,
            v1::vmm_settings::Kind::Firecracker,
        ] {
            let wire = vmm(kind);
            let spec = VmSpec::try_from(&wire).unwrap();
            assert_eq!(spec.initrd, None);
            assert_eq!(spec.vcpus, None);
            assert_eq!(v1::VmmSettings::from(&spec), wire);
        }
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let mut wire = vmm(v1::vmm_settings::Kind::Qemu);
        wire.kind = 9;
        assert_eq!(VmSpec::try_from(&wire), Err(SpecError::UnknownVmmKind(9)));
        let req = v1::CreateSandboxRequest {
            template: "t".into(),
            provider: 7,
            ..Default::default()
        };
        assert_eq!(
            SandboxSpec::try_from(&req),
            Err(SpecError::UnknownProviderKind(7))
        );
    }

    #[test]
    fn a_create_request_becomes_a_spec() {
        let req = v1::CreateSandboxRequest {
            template: "t".into(),
            id: String::new(),
            provider: v1::ProviderKind::Kernel as i32,
            vmm: None,
            disk_size_bytes: 0,
            quota_bytes: 0,
        };
        let spec = SandboxSpec::try_from(&req).unwrap();
        assert_eq!(spec.id, None);
        assert_eq!(spec.provider, ProviderKind::Kernel);
        let req = v1::CreateSandboxRequest {
            id: "mine".into(),
            provider: v1::ProviderKind::Unspecified as i32,
            ..req
        };
        let spec = SandboxSpec::try_from(&req).unwrap();
        assert_eq!(
            (spec.id.as_deref(), spec.provider),
            (Some("mine"), ProviderKind::Socket)
        );
    }

    #[test]
    fn every_state_maps_to_its_wire_name() {
        for s in SandboxState::ALL {
            let wire = v1::SandboxState::from(s);
            assert_eq!(
                wire.as_str_name()
                    .trim_start_matches("SANDBOX_STATE_")
                    .to_ascii_lowercase(),
                s.as_str()
            );
        }
    }
}
