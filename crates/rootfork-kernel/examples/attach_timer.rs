//! One timed attach/detach cycle of any NBD server on `/dev/nbdN`, measured the same way for
//! every server: used by `scripts/bench-kernel` inside the test VM (the guest's busybox has no
//! sub-second clock).
//!
//! ```text
//! attach_timer --attach 'SHELL COMMAND' [--device /dev/nbdN] [--detach 'SHELL COMMAND']
//!              [--stdout FILE] [--timeout-secs 60]
//! ```
//!
//! - **attach**: the clock starts just before `sh -c ATTACH` is spawned and stops when the device
//!   has read its first 4 KiB block (`O_DIRECT`, offset 0). The device is `--device`, or the
//!   first line the command prints (`rootfork nbd attach` prints it once attached). The device is
//!   opened only after sysfs shows it connected (`pid` present, `size` ≠ 0): opening an
//!   unconfigured nbd device gives it a configuration, and a netlink CONNECT of it would then be
//!   refused with `EBUSY`.
//! - **detach**: the clock starts just before `sh -c DETACH` is spawned (without `--detach`: just
//!   before the attach command gets `SIGTERM`) and stops when that command (or the attach
//!   command) has exited and the device is quiescent again (no `pid`, `size` 0).
//!
//! This process is a child subreaper, so servers that daemonize (qemu-nbd -c, nbdkit) are reaped
//! here, not left as zombies. Prints `CYCLE device=… attach_us=… detach_us=… seen_us=…` (`seen_us`:
//! when the device was known — the printed line read, or at once with `--device`); exits non-zero
//! with a message on any failure or when a step takes longer than `--timeout-secs`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const BLOCK: usize = 4096;
const POLL: Duration = Duration::from_millis(1);

#[derive(Default)]
struct Args {
    attach: Option<String>,
    detach: Option<String>,
    device: Option<PathBuf>,
    stdout: Option<PathBuf>,
    timeout: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--attach" => args.attach = Some(value()?),
            "--detach" => args.detach = Some(value()?),
            "--device" => args.device = Some(PathBuf::from(value()?)),
            "--stdout" => args.stdout = Some(PathBuf::from(value()?)),
            "--timeout-secs" => {
                let v = value()?;
                let secs: u64 = v.parse().map_err(|_| format!("bad --timeout-secs {v}"))?;
                args.timeout = Some(Duration::from_secs(secs));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.attach.is_none() {
        return Err("--attach is required".into());
    }
    Ok(args)
}

/// The device's sysfs directory (`/sys/block/nbdN`).
fn sysfs_dir(device: &Path) -> Result<PathBuf, String> {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("nbd"))
        .ok_or_else(|| format!("{} is not an nbd device", device.display()))?;
    Ok(Path::new("/sys/block").join(name))
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn connected(dir: &Path) -> bool {
    read_attr(dir, "pid").is_some_and(|p| !p.is_empty() && p != "0")
        && read_attr(dir, "size").is_some_and(|s| s != "0")
}

fn quiescent(dir: &Path) -> bool {
    !read_attr(dir, "pid").is_some_and(|p| !p.is_empty() && p != "0")
        && read_attr(dir, "size").is_some_and(|s| s == "0")
}

/// Reaps every exited child (daemonized servers re-parented here), without blocking.
fn reap_orphans() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if matches!(status, WaitStatus::StillAlive) {
            break;
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (0 if unreadable).
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Spawns `sh -c CMD` with `ROOTFORK_PHASE_T0_NS` set to the monotonic time just before the
/// spawn (a rootfork profiling with `ROOTFORK_PHASE_PROFILE=1` reports its phases from it;
/// every other server ignores it).
fn spawn_shell(cmd: &str, stdout: Option<&Path>) -> Result<Child, String> {
    let out = match stdout {
        Some(path) => {
            Stdio::from(File::create(path).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => Stdio::null(),
    };
    Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("ROOTFORK_PHASE_T0_NS", monotonic_ns().to_string())
        .stdout(out)
        .spawn()
        .map_err(|e| format!("spawn sh -c {cmd}: {e}"))
}

/// One O_DIRECT read of the first block; true when all of it came back.
fn reads_first_block(device: &Path, buf: &mut [u8]) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(device)
    else {
        return false;
    };
    matches!(file.read_at(buf, 0), Ok(n) if n == BLOCK)
}

/// A 4096-aligned 4096-byte window of `storage` (O_DIRECT needs an aligned buffer).
fn aligned(storage: &mut [u8]) -> &mut [u8] {
    let skip = storage.as_ptr().align_offset(BLOCK);
    &mut storage[skip..skip + BLOCK]
}

/// The attach command: on an early return (a failed cycle) it gets `SIGTERM` and is waited for
/// (up to 10 s), so no server outlives this process unnoticed.
struct AttachChild(Option<Child>);

impl AttachChild {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("present until taken")
    }
}

impl Drop for AttachChild {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && matches!(child.try_wait(), Ok(None)) {
            sleep(POLL);
        }
    }
}

struct Deadline {
    end: Instant,
    what: &'static str,
}

impl Deadline {
    fn check(&self) -> Result<(), String> {
        if Instant::now() > self.end {
            return Err(format!("timed out waiting for {}", self.what));
        }
        Ok(())
    }
}

fn child_failed(child: &mut Child) -> Result<Option<ExitStatus>, String> {
    match child.try_wait() {
        Ok(Some(status)) if !status.success() => Err(format!("command failed: {status}")),
        Ok(other) => Ok(other),
        Err(e) => Err(format!("wait: {e}")),
    }
}

fn run(args: Args) -> Result<(), String> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let timeout = args.timeout.unwrap_or(Duration::from_secs(60));
    let attach_cmd = args.attach.as_deref().unwrap_or_default();
    let stdout_file = args
        .stdout
        .clone()
        .unwrap_or_else(|| PathBuf::from("/tmp/attach_timer.out"));
    let mut storage = vec![0u8; 2 * BLOCK];
    let buf = aligned(&mut storage);

    // --- attach ---
    let start = Instant::now();
    let mut child = AttachChild(Some(spawn_shell(attach_cmd, Some(&stdout_file))?));
    let deadline = Deadline {
        end: start + timeout,
        what: "the device to read its first block",
    };
    let device = loop {
        if let Some(device) = &args.device {
            break device.clone();
        }
        let printed = std::fs::read_to_string(&stdout_file).unwrap_or_default();
        if let Some(line) = printed
            .split_inclusive('\n')
            .next()
            .filter(|l| l.ends_with('\n'))
        {
            break PathBuf::from(line.trim());
        }
        if let Some(status) = child_failed(child.get())? {
            return Err(format!(
                "attach command exited ({status}) without printing a device"
            ));
        }
        deadline.check()?;
        sleep(POLL);
    };
    let seen_us = start.elapsed().as_micros();
    let dir = sysfs_dir(&device)?;
    while !(connected(&dir) && reads_first_block(&device, buf)) {
        child_failed(child.get())?;
        deadline.check()?;
        sleep(POLL);
    }
    let attach_us = start.elapsed().as_micros();

    // --- detach ---
    let start = Instant::now();
    let deadline = Deadline {
        end: start + timeout,
        what: "the detach",
    };
    let mut waited = match &args.detach {
        Some(cmd) => spawn_shell(cmd, None)?,
        None => {
            let pid = Pid::from_raw(i32::try_from(child.get().id()).map_err(|e| e.to_string())?);
            kill(pid, Signal::SIGTERM).map_err(|e| format!("SIGTERM {pid}: {e}"))?;
            child.0.take().expect("present until taken")
        }
    };
    loop {
        if let Some(status) = waited.try_wait().map_err(|e| format!("wait: {e}"))? {
            if !status.success() {
                return Err(format!("detach failed: {status}"));
            }
            break;
        }
        deadline.check()?;
        sleep(POLL);
    }
    while !quiescent(&dir) {
        deadline.check()?;
        sleep(POLL);
    }
    let detach_us = start.elapsed().as_micros();
    reap_orphans();
    println!(
        "CYCLE device={} attach_us={attach_us} detach_us={detach_us} seen_us={seen_us}",
        device.display()
    );
    Ok(())
}

fn main() {
    let result = parse_args().and_then(run);
    reap_orphans();
    if let Err(e) = result {
        eprintln!("attach_timer: {e}");
        std::process::exit(1);
    }
}
