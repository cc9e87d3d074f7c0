//! The remote store against a real S3-compatible server on loopback.
//!
//! `scripts/test.d/40-store-s3.sh` starts `s3s-fs`, exports the variables below and runs these
//! tests with `--ignored`. Run that way without a server (or without the variables) they fail;
//! plain `cargo test` lists them as ignored.
//!
//! - `ROOTFORK_S3_ENDPOINT`, `ROOTFORK_S3_BUCKET`, `ROOTFORK_S3_ACCESS_KEY`,
//!   `ROOTFORK_S3_SECRET_KEY`: the server;
//! - `ROOTFORK_S3_PID`: its process (stopped and continued to simulate a hung server);
//! - `ROOTFORK_S3_ROOT`: its data directory (to damage an object at rest);
//! - `ROOTFORK_S3S_FS`: the server binary (the restart test starts its own instance).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rootfork_block::layered::BuildResolver;
use rootfork_block::BlockDevice;
use rootfork_store::{Backend, RemoteStore, S3Config, StoreConfig};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run these tests through scripts/test.d/40-store-s3.sh")
    })
}

fn s3(endpoint: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_owned()),
        bucket: env("ROOTFORK_S3_BUCKET"),
        region: "us-east-1".into(),
        access_key_id: env("ROOTFORK_S3_ACCESS_KEY"),
        secret_access_key: env("ROOTFORK_S3_SECRET_KEY"),
        allow_http: true,
    }
}

/// A config with a per-test prefix so tests sharing the server do not see each other's builds.
/// Readahead is off: these tests count the fetches of demand reads (the prefetch test turns it
/// on where it checks it).
fn s3_config(dir: &Path, endpoint: &str, prefix: &str) -> StoreConfig {
    let mut cfg = config(dir, Backend::S3(s3(endpoint)));
    cfg.prefix = prefix.into();
    cfg.fetch.readahead = false;
    cfg
}

/// Continues a stopped server when dropped, on every exit path of a test.
struct Continue(Pid);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_upload_and_lazy_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(40 * MIB, 11);
    let (local, base) = local_base(dir.path(), &img);
    let remote =
        RemoteStore::new(&s3_config(dir.path(), &env("ROOTFORK_S3_ENDPOINT"), "lazy")).unwrap();
    let report = remote.upload(&local, &base).unwrap();
    assert_eq!(report.uploaded, vec![base]);
    assert!(
        remote.upload(&local, &base).unwrap().uploaded.is_empty(),
        "uploaded once"
    );

    let t = remote.open(&base).unwrap();
    let s0 = remote.stats();
    assert_eq!(s0.chunks_fetched, 0, "open fetches no data");
    // Three reads in two distinct 4 MiB chunks of the data.
    for off in [100, 8 * MIB + 7, 8 * MIB + 65536] {
        assert_eq!(read(&t, off, 4096), img[off as usize..][..4096]);
    }
    let s = remote.stats();
    assert_eq!(s.chunks_fetched, 2, "only touched chunks are fetched");
    assert_eq!(s.bytes_fetched - s0.bytes_fetched, 8 * MIB);
    assert_eq!(s.cache_misses, 2, "the third read hit the cache");
    // And everything reads back exactly.
    assert_eq!(read(&t, 0, img.len()), img);
    let data_len = local.map(&base).unwrap().header.data_len;
    assert_eq!(remote.stats().chunks_fetched, data_len.div_ceil(4 * MIB));
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_stopped_server_gives_eio_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(16 * MIB, 12);
    let (local, base) = local_base(dir.path(), &img);
    let remote =
        RemoteStore::new(&s3_config(dir.path(), &env("ROOTFORK_S3_ENDPOINT"), "stop")).unwrap();
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    read(&t, 0, 4096);

    // Freeze the server: the request is sent on a live connection and never answered.
    let pid = Pid::from_raw(env("ROOTFORK_S3_PID").parse().unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = t.read_at(&mut buf, 6 * MIB);
    kill(pid, Signal::SIGCONT).unwrap();
    let err = err.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the deadline held"
    );
    assert_eq!(remote.stats().timeouts, 1);
    assert_eq!(remote.cache().len(), 1, "the failed chunk was not cached");

    // Server back: the same read succeeds.
    assert_eq!(read(&t, 6 * MIB, 4096), img[(6 * MIB) as usize..][..4096]);
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(root: &Path, port: u16) -> Server {
    let child = Command::new(env("ROOTFORK_S3S_FS"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", &env("ROOTFORK_S3_ACCESS_KEY")])
        .args(["--secret-key", &env("ROOTFORK_S3_SECRET_KEY")])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(child)
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_killed_server_gives_eio_and_recovers_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().join("s3root");
    std::fs::create_dir_all(root.join(env("ROOTFORK_S3_BUCKET"))).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = start_server(&root, port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let img = image_bytes(12 * MIB, 13);
    let (local, base) = local_base(dir.path(), &img);
    let remote = RemoteStore::new(&s3_config(dir.path(), &endpoint, "restart")).unwrap();
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    read(&t, 0, 4096);

    drop(server);
    let mut buf = vec![0u8; 4096];
    assert_eq!(t.read_at(&mut buf, 5 * MIB).unwrap_err().errno(), libc::EIO);
    assert!(
        remote.stats().retries >= 1,
        "connection failures are retried"
    );
    assert_eq!(remote.cache().len(), 1);

    let _server = start_server(&root, port);
    assert_eq!(read(&t, 5 * MIB, 4096), img[(5 * MIB) as usize..][..4096]);
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_corrupted_object_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(12 * MIB, 14);
    let (local, base) = local_base(dir.path(), &img);
    let remote = RemoteStore::new(&s3_config(
        dir.path(),
        &env("ROOTFORK_S3_ENDPOINT"),
        "corrupt",
    ))
    .unwrap();
    remote.upload(&local, &base).unwrap();
    // Flip one byte of the stored data object at rest, in its second 4 MiB chunk.
    let object = Path::new(&env("ROOTFORK_S3_ROOT"))
        .join(env("ROOTFORK_S3_BUCKET"))
        .join(remote.key(&base, "data"));
    let mut bytes = std::fs::read(&object).expect("the object is a file under the server root");
    bytes[(5 * MIB) as usize] ^= 0x80;
    std::fs::write(&object, &bytes).unwrap();

    let t = remote.open(&base).unwrap();
    // The first chunk is intact.
    assert_eq!(read(&t, 0, 4096), img[..4096]);
    // Any read that needs the damaged chunk fails with EIO and nothing of it is cached.
    let mut buf = vec![0u8; 4096];
    let device_offset = 7 * MIB; // data chunk 1 (device bytes map densely at the start)
    assert_eq!(
        t.read_at(&mut buf, device_offset).unwrap_err().errno(),
        libc::EIO
    );
    assert!(remote.stats().checksum_failures >= 1);
    assert_eq!(remote.cache().len(), 1);
}

/// Reads 4 KiB in 4 MiB chunk `chunk` of a dense image (device offsets equal data offsets).
fn read_chunk(dev: &dyn BlockDevice, img: &[u8], chunk: u64) {
    let off = chunk * 4 * MIB + 777;
    assert_eq!(read(dev, off, 4096), img[off as usize..][..4096]);
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_boot_trace_prefetch_and_readahead() {
    let dir = tempfile::tempdir().unwrap();
    let img = dense_image(24 * MIB, 15);
    let (local, base) = local_base(dir.path(), &img);
    let endpoint = env("ROOTFORK_S3_ENDPOINT");
    let first = RemoteStore::new(&s3_config(&dir.path().join("a"), &endpoint, "trace")).unwrap();
    first.upload(&local, &base).unwrap();
    let pattern = [3, 0, 4, 3, 1];
    {
        let (t, log) = first.open_recording(&base).unwrap();
        for c in pattern {
            read_chunk(&t, &img, c);
        }
        first.put_boot_trace(&base, &log.trace()).unwrap();
    }
    // A cold start with a fresh cache: trace fetched, prefetched, then the same reads.
    let remote = RemoteStore::new(&s3_config(&dir.path().join("b"), &endpoint, "trace")).unwrap();
    let trace = remote.boot_trace(&base).unwrap();
    assert_eq!(
        trace.chunks.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![3, 0, 4, 1]
    );
    let t = remote.open(&base).unwrap();
    let report = remote.prefetch(&trace).wait();
    assert_eq!((report.fetched, report.failed), (4, 0));
    let before = remote.stats();
    for c in pattern {
        read_chunk(&t, &img, c);
    }
    let after = remote.stats();
    assert_eq!(after.requests, before.requests, "no GET during the replay");
    assert_eq!(after.prefetch_hits, 4);

    // Readahead: with it on, a step from chunk 0 to 1 brings chunk 2 in.
    let mut cfg = s3_config(&dir.path().join("c"), &endpoint, "trace");
    cfg.fetch.readahead = true;
    let ra = RemoteStore::new(&cfg).unwrap();
    let t = ra.open(&base).unwrap();
    read_chunk(&t, &img, 0);
    read_chunk(&t, &img, 1);
    ra.wait_background();
    assert_eq!(ra.stats().readahead, 1);
    let before = ra.stats();
    read_chunk(&t, &img, 2);
    assert_eq!(ra.stats().requests, before.requests);
    assert_eq!(ra.stats().readahead_hits, 1);
}

#[test]
#[ignore = "needs the S3 server of scripts/test.d/40-store-s3.sh"]
fn s3_prefetch_with_the_server_stopped_fails_softly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dense_image(16 * MIB, 16);
    let (local, base) = local_base(dir.path(), &img);
    let endpoint = env("ROOTFORK_S3_ENDPOINT");
    let first = RemoteStore::new(&s3_config(&dir.path().join("a"), &endpoint, "pfstop")).unwrap();
    first.upload(&local, &base).unwrap();
    let (t, log) = first.open_recording(&base).unwrap();
    for c in [2, 0, 1] {
        read_chunk(&t, &img, c);
    }
    let trace = log.trace();

    let remote = RemoteStore::new(&s3_config(&dir.path().join("b"), &endpoint, "pfstop")).unwrap();
    let t = remote.open(&base).unwrap();
    let pid = Pid::from_raw(env("ROOTFORK_S3_PID").parse().unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let resume = Continue(pid);
    let report = remote.prefetch(&trace).wait();
    assert_eq!((report.fetched, report.failed), (0, 3), "{report:?}");
    assert!(remote.cache().is_empty(), "failures are not cached");
    // While it is stopped a read fails with EIO, as without prefetch.
    let mut buf = vec![0u8; 4096];
    assert_eq!(t.read_at(&mut buf, 0).unwrap_err().errno(), libc::EIO);
    drop(resume);
    // Server back: the reads work.
    for c in [2, 0, 1] {
        read_chunk(&t, &img, c);
    }
}
