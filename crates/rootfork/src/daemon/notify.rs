//! systemd's service notification protocol (`sd_notify(3)`): the daemon tells its service
//! manager `READY=1` once its API answers, `WATCHDOG=1` while its health loop keeps finishing
//! rounds, `STOPPING=1` when it begins to stop, and a one-line `STATUS=`.
//!
//! The protocol is one datagram per message, `KEY=VALUE` lines, sent to the `AF_UNIX` socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without
//! `$NOTIFY_SOCKET` (run by hand, in tests, under another supervisor) there is no notifier and
//! nothing is sent.
//!
//! The watchdog is not a blind timer: [`keep_alive`] sends `WATCHDOG=1` only while the health
//! loop's heartbeat (the end of its last round) is recent, so a health loop that hangs — a probe
//! that never returns, a lock held forever, a starved runtime — stops the keep-alives and systemd
//! restarts the daemon after `WatchdogSec=`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The variable naming the notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The variable carrying the watchdog period in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The variable naming the process the watchdog period is meant for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Why notifications cannot be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor `@name`.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract @name")]
    BadSocket(OsString),
    /// `$WATCHDOG_USEC` is not a positive whole number of microseconds.
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdogUsec(String),
    /// The socket could not be created or the datagram not sent.
    #[error("sd_notify: {0}")]
    Io(#[from] std::io::Error),
}

/// One notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Start-up is finished: the API answers.
    Ready,
    /// The daemon begins to stop.
    Stopping,
    /// The watchdog keep-alive.
    Watchdog,
    /// A one-line status for `systemctl status` (newlines become spaces).
    Status(&'a str),
}

impl State<'_> {
    fn line(&self) -> String {
        match self {
            State::Ready => "READY=1".into(),
            State::Stopping => "STOPPING=1".into(),
            State::Watchdog => "WATCHDOG=1".into(),
            State::Status(s) => format!("STATUS={}", s.replace('\n', " ")),
        }
    }
}

/// The datagram for `states`: one `KEY=VALUE` line each.
pub fn message(states: &[State<'_>]) -> String {
    let mut m = String::new();
    for s in states {
        m.push_str(&s.line());
        m.push('\n');
    }
    m
}

/// A connected notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for, or `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `socket`: an absolute path, or `@name` (abstract namespace).
    pub fn new(socket: &OsStr) -> Result<Notifier, NotifyError> {
        let bytes = socket.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(socket)?,
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])?
            }
            _ => return Err(NotifyError::BadSocket(socket.to_owned())),
        };
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier { socket, target })
    }

    /// Sends `states` in one datagram.
    pub fn send(&self, states: &[State<'_>]) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message(states).as_bytes(), &self.target)?;
        Ok(())
    }
}

/// The watchdog period systemd set for this process: `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is
/// unset or names `pid` (`sd_watchdog_enabled(3)`); `None` when there is no watchdog.
pub fn watchdog_period(
    usec: Option<&str>,
    for_pid: Option<&str>,
    pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if let Some(p) = for_pid.filter(|p| !p.is_empty()) {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n))),
        _ => Err(NotifyError::BadWatchdogUsec(usec.to_owned())),
    }
}

/// [`watchdog_period`] from this process's environment.
pub fn watchdog_period_from_env() -> Result<Option<Duration>, NotifyError> {
    let usec = std::env::var(WATCHDOG_USEC).ok();
    let pid = std::env::var(WATCHDOG_PID).ok();
    watchdog_period(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Removes the notification variables from this process's environment, so the VMs and tools the
/// daemon starts do not inherit them (`sd_notify`'s `unset_environment`). Call it before any
/// thread exists.
pub fn forget_env() {
    for v in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
        std::env::remove_var(v);
    }
}

/// Whether the API answers on `socket`: one `ListTemplates` call over it, the readiness
/// `READY=1` stands for. Returns the number of templates.
pub async fn api_answers(socket: &std::path::Path) -> Result<usize, crate::client::ClientError> {
    let target = crate::client::ApiTarget::Unix(socket.to_owned());
    let mut c = crate::client::connect(&target).await?;
    let list = c
        .templates
        .list_templates(crate::api::v1::ListTemplatesRequest {})
        .await
        .map_err(|status| crate::client::ClientError::Other {
            target: socket.display().to_string(),
            message: status.message().to_owned(),
        })?;
    Ok(list.into_inner().templates.len())
}

/// Whether the health loop is alive: its last round ended at most `stale_after` before `now`.
pub fn health_is_fresh(last_round_end: Instant, now: Instant, stale_after: Duration) -> bool {
    now.saturating_duration_since(last_round_end) <= stale_after
}

/// How long the health loop may go without finishing a round before the keep-alives stop: the
/// watchdog period less the half-period between keep-alives, so systemd sees the silence within
/// one period; never less than two health intervals.
pub fn stale_after(period: Duration, health_interval: Duration) -> Duration {
    (period / 2).max(health_interval * 2)
}

/// Sends `WATCHDOG=1` every half `period` while `heartbeat` (the end of the health loop's last
/// round) is fresh by [`stale_after`]; withholds it, with a warning, while it is not. Runs until
/// `stop` changes.
pub async fn keep_alive(
    notifier: std::sync::Arc<Notifier>,
    period: Duration,
    health_interval: Duration,
    heartbeat: watch::Receiver<Instant>,
    mut stop: watch::Receiver<bool>,
) {
    let stale = stale_after(period, health_interval);
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let last = *heartbeat.borrow();
        if health_is_fresh(last, Instant::now(), stale) {
            if withheld {
                tracing::info!("health loop finished a round again; watchdog keep-alives resume");
                withheld = false;
            }
            if let Err(e) = notifier.send(&[State::Watchdog]) {
                tracing::warn!("{e}");
            }
        } else if !withheld {
            withheld = true;
            tracing::warn!(
                since_secs = last.elapsed().as_secs_f64(),
                "the health loop has not finished a round; withholding WATCHDOG=1 so systemd restarts the daemon"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_one_line_per_state() {
        assert_eq!(
            message(&[State::Ready, State::Status("serving\n3 sandboxes")]),
            "READY=1\nSTATUS=serving 3 sandboxes\n"
        );
        assert_eq!(message(&[State::Watchdog]), "WATCHDOG=1\n");
        assert_eq!(message(&[State::Stopping]), "STOPPING=1\n");
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.send(&[State::Ready]).unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\n");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rootfork-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.send(&[State::Watchdog]).unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn relative_or_empty_socket_is_refused() {
        assert!(matches!(
            Notifier::new(OsStr::new("run/notify")),
            Err(NotifyError::BadSocket(_))
        ));
        assert!(matches!(
            Notifier::new(OsStr::new("")),
            Err(NotifyError::BadSocket(_))
        ));
    }

    #[test]
    fn send_to_a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("gone.sock").as_os_str()).unwrap();
        assert!(matches!(n.send(&[State::Ready]), Err(NotifyError::Io(_))));
    }

    #[test]
    fn watchdog_period_follows_sd_watchdog_enabled() {
        assert_eq!(watchdog_period(None, None, 7).unwrap(), None);
        assert_eq!(
            watchdog_period(Some("2000000"), None, 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_period(Some("2000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        // Meant for another process (a parent that did not clear its environment).
        assert_eq!(
            watchdog_period(Some("2000000"), Some("8"), 7).unwrap(),
            None
        );
        assert!(matches!(
            watchdog_period(Some("0"), None, 7),
            Err(NotifyError::BadWatchdogUsec(_))
        ));
        assert!(matches!(
            watchdog_period(Some("soon"), None, 7),
            Err(NotifyError::BadWatchdogUsec(_))
        ));
    }

    #[test]
    fn a_stalled_health_loop_is_not_fresh() {
        let now = Instant::now();
        let stale = stale_after(Duration::from_secs(60), Duration::from_secs(5));
        assert_eq!(stale, Duration::from_secs(30));
        assert!(health_is_fresh(now, now, stale));
        assert!(health_is_fresh(now - Duration::from_secs(29), now, stale));
        assert!(!health_is_fresh(now - Duration::from_secs(31), now, stale));
        // A slow health interval widens the bound to two intervals.
        assert_eq!(
            stale_after(Duration::from_secs(10), Duration::from_secs(20)),
            Duration::from_secs(40)
        );
    }

    #[tokio::test]
    async fn keep_alive_withholds_while_the_heartbeat_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let n = std::sync::Arc::new(Notifier::new(path.as_os_str()).unwrap());
        let period = Duration::from_millis(200);
        let interval = Duration::from_millis(10);
        // The last round ended long ago: no keep-alive may be sent.
        let (beat_tx, beat_rx) = watch::channel(Instant::now() - Duration::from_secs(3600));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive(n, period, interval, beat_rx, stop_rx));
        tokio::time::sleep(period * 3).await;
        let mut buf = [0u8; 64];
        assert!(
            rx.recv(&mut buf).is_err(),
            "a keep-alive was sent for a stalled health loop"
        );
        // Rounds finish again: keep-alives resume.
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            beat_tx.send(Instant::now()).unwrap();
            if let Ok(len) = rx.recv(&mut buf) {
                break buf[..len].to_vec();
            }
            assert!(
                Instant::now() < deadline,
                "no keep-alive after the heartbeat"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(got, b"WATCHDOG=1\n");
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
