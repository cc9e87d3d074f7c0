//! Hand-over and adoption through the fake kernel: a device handed over (or left by a dead
//! process) is served again with RECONFIGURE and no CONNECT; a device of another sandbox, one
//! claimed by a live process or one not connected is refused untouched; one whose size changed
//! is disconnected and released; `disconnect_own` ends a device that will not be adopted.

use super::*;

/// What the next process of the instance sees after this one handed over or died: no claim in
/// this process, and the kernel has marked the device's sockets dead (their peers closed).
fn new_process(env: &Env, index: u32) {
    let pool = env.attacher.pool();
    pool.shared.retained.lock().clear();
    pool.shared.local.lock().clear();
    pool.shared
        .metrics
        .claimed
        .store(0, std::sync::atomic::Ordering::Relaxed);
    env.kernel.connected.lock().get_mut(&index).unwrap().clear();
}

#[test]
fn a_handed_over_device_is_adopted_without_connect() {
    let env = Env::new(2);
    rt().block_on(async {
        let a = env.attach(2).await;
        let i = a.index();
        let flushes = env.nodes.flushes.load(Ordering::SeqCst);
        a.hand_over().await.unwrap();
        // Flushed, still connected, dispatchers stopped, claim kept.
        assert_eq!(env.nodes.flushes.load(Ordering::SeqCst), flushes + 1);
        assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 0);
        assert!(env.kernel.connected.lock().contains_key(&i));
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 0);
        assert!(env.attacher.pool().locks().try_lock(i).unwrap().is_none());

        new_process(&env, i);
        let own = env.attacher.pool().own_devices().unwrap();
        assert_eq!(own.len(), 1);
        assert!(own[0].orphaned);
        assert_eq!(own[0].sandbox, "sb");
        let b = env
            .attacher
            .adopt(&env.dispatcher, i, "sb", &env.opts(2))
            .await
            .unwrap();
        assert_eq!(b.index(), i);
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 2);
        assert_eq!(b.connection_health().dead, 0);
        let reqs = env.kernel.reconfigures.lock().clone();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].sockets.len(), 2);
        let backend = env.attacher.pool().sysfs().slot(i).unwrap().backend;
        assert_eq!(reqs[0].backend_identifier, backend);
        // The claim is held again: nobody else may take it.
        assert!(!env.attacher.pool().own_devices().unwrap()[0].orphaned);
        b.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn another_sandboxs_or_a_live_or_an_idle_device_is_refused_untouched() {
    let env = Env::new(2);
    rt().block_on(async {
        let a = env.attach(1).await;
        let i = a.index();
        // Still held by this (live) process.
        let err = env
            .attacher
            .adopt(&env.dispatcher, i, "sb", &env.opts(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AttachError::Pool(crate::pool::PoolError::Held { .. })),
            "{err:?}"
        );
        a.hand_over().await.unwrap();
        new_process(&env, i);
        let err = env
            .attacher
            .adopt(&env.dispatcher, i, "another", &env.opts(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AttachError::BackendMismatch { index, .. } if index == i),
            "{err:?}"
        );
        assert_eq!(err.errno(), libc::EPERM);
        assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 0);
        // The refused claim was released: the right sandbox adopts it.
        let b = env
            .attacher
            .adopt(&env.dispatcher, i, "sb", &env.opts(1))
            .await
            .unwrap();
        b.close().await.unwrap();
        // A slot that is not connected.
        let err = env
            .attacher
            .adopt(&env.dispatcher, i, "sb", &env.opts(1))
            .await
            .unwrap_err();
        assert!(matches!(err, AttachError::NotConnected { .. }), "{err:?}");
    });
    env.assert_clean();
}

#[test]
fn a_resized_device_is_disconnected_and_released() {
    let env = Env::new(1);
    rt().block_on(async {
        let a = env.attach(1).await;
        let i = a.index();
        a.hand_over().await.unwrap();
        new_process(&env, i);
        std::fs::write(env.sys.join(format!("block/nbd{i}/size")), "4096\n").unwrap();
        let err = env
            .attacher
            .adopt(&env.dispatcher, i, "sb", &env.opts(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AttachError::SizeMismatch { expected, got, .. } if expected == 1 << 20 && got == 4096 * 512),
            "{err:?}"
        );
        assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 1);
    });
    env.assert_clean();
}

#[test]
fn a_device_that_will_not_be_adopted_is_disconnected_by_its_instance() {
    let env = Env::new(1);
    rt().block_on(async {
        let a = env.attach(2).await;
        let i = a.index();
        a.hand_over().await.unwrap();
        new_process(&env, i);
        env.attacher
            .disconnect_own(i, "sb", &env.opts(2))
            .await
            .unwrap();
        assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 1);
        assert!(env.attacher.pool().own_devices().unwrap().is_empty());
    });
    env.assert_clean();
}
