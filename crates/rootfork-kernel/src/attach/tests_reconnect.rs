//! Health and reconnect through the fake kernel: a connection killed from the kernel's side is
//! seen dead and replaced with RECONFIGURE (right index, backend, one socket per dead
//! connection); refusals, a kernel that drops the sockets, cancellation and a close with every
//! connection dead leave nothing behind.

use super::*;

/// Closes the kernel's end of connection `k` of device `index`: our dispatch reads EOF and ends,
/// as when the kernel gives up on a socket.
fn kill(env: &Env, index: u32, k: usize) {
    drop(
        env.kernel
            .connected
            .lock()
            .get_mut(&index)
            .unwrap()
            .remove(k),
    );
}

/// Waits (bounded) until `a` shows `dead` dead connections.
async fn until_dead(a: &Attachment, dead: usize) {
    let seen = wait::until(Duration::from_secs(10), || {
        (a.connection_health().dead == dead).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{:?}", a.connection_health());
}

/// Sockets the fake kernel holds for `index`.
fn kernel_sockets(env: &Env, index: u32) -> usize {
    env.kernel.connected.lock().get(&index).map_or(0, Vec::len)
}

#[test]
fn a_dead_connection_is_seen_and_replaced() {
    let env = Env::new(1);
    rt().block_on(async {
        let mut a = env.attach(2).await;
        let i = a.index();
        assert_eq!(
            a.connection_health(),
            ConnectionHealth {
                connections: 2,
                ..Default::default()
            }
        );
        kill(&env, i, 1);
        until_dead(&a, 1).await;
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 1);
        let reqs = env.kernel.reconfigures.lock().clone();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].index, i);
        assert_eq!(reqs[0].sockets.len(), 1);
        // The backend identifier the device was connected with, repeated.
        let backend = env.attacher.pool().sysfs().slot(i).unwrap().backend;
        assert!(backend.is_some());
        assert_eq!(reqs[0].backend_identifier, backend);
        // Only the socket was set: timeouts and flags stay as they are.
        assert_eq!(reqs[0].timeout_secs, None);
        assert_eq!(reqs[0].client_flags, None);
        assert_eq!(a.connection_health().dead, 0);
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 2);
        assert_eq!(kernel_sockets(&env, i), 2);
        // Both connections die: both are replaced by one request with two sockets.
        kill(&env, i, 0);
        kill(&env, i, 0);
        until_dead(&a, 2).await;
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 2);
        assert_eq!(env.kernel.reconfigures.lock()[1].sockets.len(), 2);
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 2);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn nothing_dead_sends_nothing() {
    let env = Env::new(1);
    rt().block_on(async {
        let mut a = env.attach(3).await;
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 0);
        assert!(env.kernel.reconfigures.lock().is_empty());
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 3);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn a_refused_reconfigure_is_classified_and_the_attachment_still_closes() {
    let env = Env::new(1);
    *env.kernel.on_reconfigure.lock() = OnReconfigure::Refuse(libc::EINVAL);
    rt().block_on(async {
        let mut a = env.attach(2).await;
        kill(&env, a.index(), 0);
        until_dead(&a, 1).await;
        let err = a.reconnect(&env.dispatcher).await.unwrap_err();
        match &err {
            AttachError::Reconfigure {
                source: NlError::Refused { errno },
                ..
            } => assert_eq!(*errno, libc::EINVAL),
            other => panic!("{other:?}"),
        }
        assert_eq!(err.errno(), libc::EINVAL);
        // The replacement was stopped; the connection is still dead.
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 1);
        assert_eq!(a.connection_health().dead, 1);
        // Once the kernel accepts, the same attachment is repaired.
        *env.kernel.on_reconfigure.lock() = OnReconfigure::Work;
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 1);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn a_reconfigure_refused_after_taking_some_sockets_keeps_them() {
    let env = Env::new(1);
    rt().block_on(async {
        let mut a = env.attach(3).await;
        let i = a.index();
        kill(&env, i, 0);
        kill(&env, i, 0);
        until_dead(&a, 2).await;
        // The first of the two new sockets goes in, then the request is refused: the one taken
        // is kept (not shut down as if nothing had been), and a retry offers only the other.
        *env.kernel.on_reconfigure.lock() = OnReconfigure::TakeOneThenRefuse(libc::EBADF);
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 2);
        let reqs = env.kernel.reconfigures.lock().clone();
        assert_eq!(
            reqs.iter().map(|r| r.sockets.len()).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(a.connection_health().dead, 0);
        assert_eq!(kernel_sockets(&env, i), 3);
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 3);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn sockets_the_kernel_drops_are_detected_and_offered_again() {
    let env = Env::new(1);
    *env.kernel.on_reconfigure.lock() = OnReconfigure::Lag(3);
    rt().block_on(async {
        let mut a = env.attach(1).await;
        kill(&env, a.index(), 0);
        until_dead(&a, 1).await;
        assert_eq!(a.reconnect(&env.dispatcher).await.unwrap(), 1);
        // Three answers of "success" that took nothing, then one that took the socket.
        assert_eq!(env.kernel.reconfigures.lock().len(), 4);
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 1);
        assert_eq!(kernel_sockets(&env, a.index()), 1);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn a_kernel_that_never_takes_the_socket_is_an_error_after_connect_wait() {
    let env = Env::new(1);
    *env.kernel.on_reconfigure.lock() = OnReconfigure::Lag(usize::MAX);
    rt().block_on(async {
        let mut a = env.attach(2).await;
        kill(&env, a.index(), 0);
        until_dead(&a, 1).await;
        match a.reconnect(&env.dispatcher).await.unwrap_err() {
            AttachError::NotReconnected {
                missing: 1,
                attempts,
                waited_ms,
                ..
            } => assert!(attempts > 1 && waited_ms >= 100, "{attempts} {waited_ms}"),
            other => panic!("{other:?}"),
        }
        // Every dropped replacement was stopped and joined.
        assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 1);
        assert_eq!(a.connection_health().dead, 1);
        a.close().await.unwrap();
    });
    env.assert_clean();
}

/// Polls `fut` `n` times, 1 ms apart (so its backoff sleeps can end), or until it finishes, and
/// drops it.
async fn poll_n_then_drop_slowly<F: Future>(fut: F, n: usize) -> bool {
    let mut fut = pin!(fut);
    for _ in 0..n {
        let done = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
        if done {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

#[test]
fn a_dropped_reconnect_future_leaks_nothing() {
    let mut finished_at = None;
    for n in 0..64 {
        let env = Env::new(1);
        *env.kernel.on_reconfigure.lock() = OnReconfigure::Lag(2);
        let done = rt().block_on(async {
            let mut a = env.attach(2).await;
            let i = a.index();
            kill(&env, i, 0);
            until_dead(&a, 1).await;
            let done = poll_n_then_drop_slowly(a.reconnect(&env.dispatcher), n).await;
            // Every dispatch still running serves a socket the kernel holds, and whatever was
            // not replaced still counts as dead.
            let live = env.dispatcher.live.load(Ordering::SeqCst);
            assert_eq!(live, kernel_sockets(&env, i), "n={n}");
            assert_eq!(a.connection_health().dead, 2 - live, "n={n}");
            // And a later reconnect finishes the job.
            *env.kernel.on_reconfigure.lock() = OnReconfigure::Work;
            let again = a.reconnect(&env.dispatcher).await.unwrap();
            assert_eq!(again, if done { 0 } else { 1 }, "n={n}");
            assert_eq!(a.connection_health().dead, 0);
            a.close().await.unwrap();
            done
        });
        env.assert_clean();
        if done {
            finished_at = Some(n);
            break;
        }
    }
    // Two dropped offers, each followed by a backoff: several cancellation points.
    assert!(finished_at.is_some_and(|n| n >= 2), "{finished_at:?}");
}

#[test]
fn close_with_every_connection_dead_still_disconnects_and_releases() {
    let env = Env::new(1);
    rt().block_on(async {
        let a = env.attach(2).await;
        kill(&env, a.index(), 0);
        kill(&env, a.index(), 0);
        until_dead(&a, 2).await;
        let flushes = env.nodes.flushes.load(Ordering::SeqCst);
        match a.close().await.unwrap_err() {
            AttachError::ConnectionsDead { dead: 2, .. } => {}
            other => panic!("{other:?}"),
        }
        // No flush was attempted on a device nothing can serve.
        assert_eq!(env.nodes.flushes.load(Ordering::SeqCst), flushes);
    });
    assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 1);
    env.assert_clean();
}

#[test]
fn close_with_one_dead_connection_flushes_through_the_other() {
    let env = Env::new(1);
    rt().block_on(async {
        let a = env.attach(2).await;
        kill(&env, a.index(), 1);
        until_dead(&a, 1).await;
        a.close().await.unwrap();
    });
    assert_eq!(env.nodes.flushes.load(Ordering::SeqCst), 1);
    env.assert_clean();
}

#[test]
fn a_reconnect_with_another_device_size_is_refused() {
    let env = Env::new(1);
    struct Bigger<'a>(&'a FakeDispatcher);
    impl Dispatcher for Bigger<'_> {
        fn size(&self) -> u64 {
            self.0.size() * 2
        }
        fn server_flags(&self) -> u64 {
            self.0.server_flags()
        }
        fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>> {
            self.0.spawn(stream)
        }
    }
    rt().block_on(async {
        let mut a = env.attach(1).await;
        let err = a.reconnect(&Bigger(&env.dispatcher)).await.unwrap_err();
        assert!(matches!(err, AttachError::Invalid(_)), "{err:?}");
        a.close().await.unwrap();
    });
    env.assert_clean();
}

#[test]
fn the_reconnect_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let env = Env::new(1);
    let mut a = rt()
        .block_on(env.attacher.attach(&env.dispatcher, &env.opts(1)))
        .unwrap();
    let f = a.reconnect(&env.dispatcher);
    assert_send(&f);
    drop(f);
    rt().block_on(a.close()).unwrap();
}
