//! `AnyProvider`: the run-time choice of kind hands out the right `ProviderDevice`, and that maps
//! onto the matching QEMU root disk.

mod common;

use std::time::Duration;

use common::{make_template, never};
use rootfork_block::{OverlayOptions, TemplatePath};
use rootfork_provider::{
    AnyProvider, BaseImage, DirectProvider, Provider, ProviderDevice, ProviderError, ProviderKind,
    SocketConfig, SocketProvider,
};
use rootfork_vmm::qemu::RootDisk;

#[tokio::test]
async fn socket_and_direct_hand_out_their_own_device_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 1);

    let mut s = AnyProvider::Socket(SocketProvider::new(SocketConfig {
        base: BaseImage::Template(TemplatePath::new(&tpl)),
        socket: dir.path().join("s.sock"),
        export: "s".into(),
        cache: dir.path().join("s.cache"),
        overlay: OverlayOptions::default(),
    }));
    assert_eq!(s.kind(), ProviderKind::Socket);
    s.start().unwrap();
    let dev = s.path(Duration::from_secs(30), never()).await.unwrap();
    let ProviderDevice::Nbd(ep) = dev.clone() else {
        panic!("socket gave {dev:?}")
    };
    assert_eq!(ep.socket(), dir.path().join("s.sock"));
    assert!(matches!(dev.into_root_disk(), RootDisk::Nbd(_)));
    let paused = s.export_diff(&dir.path().join("s.diff")).await.unwrap();
    assert!(paused.map.runs.is_empty(), "nothing was written");
    s.close().await.unwrap();
    s.close().await.unwrap();

    let mut d = AnyProvider::Direct(DirectProvider::new(
        TemplatePath::new(&tpl),
        dir.path().join("d.img"),
    ));
    assert_eq!(d.kind(), ProviderKind::Direct);
    d.start().unwrap();
    let dev = d.path(Duration::from_secs(30), never()).await.unwrap();
    let ProviderDevice::Device(ready) = dev.clone() else {
        panic!("direct gave {dev:?}")
    };
    assert_eq!(ready.path(), dir.path().join("d.img"));
    assert!(matches!(dev.into_root_disk(), RootDisk::Device(_)));
    assert!(matches!(
        d.export_diff(&dir.path().join("d.diff")).await,
        Err(ProviderError::Unsupported { .. })
    ));
    d.close().await.unwrap();
}
