//! An accept loop out of file descriptors, for real: this test binary lowers its own
//! `RLIMIT_NOFILE` (it holds this one test, so no other test shares the limit), fills the table,
//! and checks that [`PacedIncoming`] pauses on the `EMFILE` accepts instead of spinning, and
//! yields the queued connection once descriptors are free again.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use rootfork::paced_incoming::PacedIncoming;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "current_thread")]
async fn accepts_failing_with_emfile_pause_and_the_connection_is_taken_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("listener.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let _client = UnixStream::connect(&path).unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let (open, _) = rootfork_nbd::fd_usage();
    setrlimit(Resource::RLIMIT_NOFILE, open + 16, hard).unwrap();
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    assert!(!filler.is_empty());
    let mut incoming = PacedIncoming::new("test", UnixListenerStream::new(listener));
    let waited = tokio::time::timeout(Duration::from_millis(500), incoming.next()).await;
    assert!(
        waited.is_err(),
        "no connection can be accepted without a descriptor"
    );
    let failures = incoming.failures();
    // An unpaced loop fails tens of thousands of times in 500 ms; paced: 10, 20, 40, ... ms.
    assert!((1..10).contains(&failures), "{failures} failed accepts");
    drop(filler);
    let conn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("the queued connection is accepted once descriptors are free");
    assert!(conn.unwrap().is_ok());
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
}
