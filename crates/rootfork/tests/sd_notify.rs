//! `rootfork serve` under a fake service manager: a datagram socket standing in for systemd's
//! `$NOTIFY_SOCKET`. The daemon must send `READY=1` only once its API answers, keep the watchdog
//! fed (`WATCHDOG_USEC`) while its health loop runs, send `STOPPING=1` on SIGTERM and exit
//! cleanly; a malformed `$NOTIFY_SOCKET` is a clear start error.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ServeProcess;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn serve(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rootfork"));
    c.arg("serve")
        .arg("--state-dir")
        .arg(dir.join("s"))
        .arg("--nbd-lock-dir")
        .arg(dir.join("locks"))
        .arg("--no-demo")
        .arg("--health-interval")
        .arg("0.1")
        .env_remove("WATCHDOG_PID")
        .env_remove("ROOTFORK_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

/// Runs `cmd` to its exit (killed if still running after 60 s); its status and stderr.
fn run_to_exit(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut p = ServeProcess(cmd.stderr(Stdio::piped()).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    p.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status, err)
}

/// The next datagram, as text (60 s at most).
fn next(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = rx.recv(&mut buf).expect("a notification within 60 s");
    String::from_utf8(buf[..len].to_vec()).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_after_the_api_answers_watchdog_while_healthy_stopping_on_sigterm() {
    let dir = tempfile::Builder::new()
        .prefix("rfn")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let child = serve(dir.path())
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut proc = ServeProcess(child);
    let pid = Pid::from_raw(proc.0.id() as i32);

    let first = next(&rx);
    assert!(first.lines().any(|l| l == "READY=1"), "first: {first:?}");
    assert!(
        first
            .lines()
            .any(|l| l.starts_with("STATUS=serving the API")),
        "{first:?}"
    );
    // The API answers at once: READY=1 was sent after a call to it succeeded.
    let mut c = rootfork::client::connect(&rootfork::client::ApiTarget::Unix(
        dir.path().join("s/api.sock"),
    ))
    .await
    .expect("the API answers once READY=1 is sent");
    c.templates
        .list_templates(rootfork::api::v1::ListTemplatesRequest {})
        .await
        .expect("ListTemplates");

    // Keep-alives every half period (0.5 s) while the health loop (0.1 s) runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut keepalives = 0;
    while keepalives < 3 {
        assert!(Instant::now() < deadline, "too few WATCHDOG=1");
        let m = next(&rx);
        assert_eq!(m, "WATCHDOG=1\n");
        keepalives += 1;
    }

    kill(pid, Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no STOPPING=1");
        let m = next(&rx);
        if m.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert_eq!(m, "WATCHDOG=1\n", "unexpected notification");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_malformed_notify_socket_is_a_clear_start_error() {
    let dir = tempfile::Builder::new()
        .prefix("rfn")
        .tempdir_in("/tmp")
        .unwrap();
    let (status, err) = run_to_exit(serve(dir.path()).env("NOTIFY_SOCKET", "relative/notify.sock"));
    assert!(!status.success());
    assert!(err.contains("NOTIFY_SOCKET"), "{err}");
}

#[test]
fn a_malformed_watchdog_period_is_a_clear_start_error() {
    let dir = tempfile::Builder::new()
        .prefix("rfn")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("notify.sock");
    let _rx = UnixDatagram::bind(&sock).unwrap();
    let (status, err) = run_to_exit(
        serve(dir.path())
            .env("NOTIFY_SOCKET", &sock)
            .env("WATCHDOG_USEC", "soon"),
    );
    assert!(!status.success());
    assert!(err.contains("WATCHDOG_USEC"), "{err}");
}
