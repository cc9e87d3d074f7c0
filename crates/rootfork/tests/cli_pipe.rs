//! The CLI's client commands end quietly when their output pipe is closed (`rootfork ... |
//! head -1`) instead of panicking on `EPIPE`.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_pipe_ends_a_client_command_without_a_panic() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    // The reader is gone before the command writes anything: its first write gets EPIPE.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_rootfork"))
        .args(["completions", "bash"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("running rootfork");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "the command panicked on a closed pipe: {stderr}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "expected the default SIGPIPE ending, got {:?} ({stderr})",
        out.status
    );
}
