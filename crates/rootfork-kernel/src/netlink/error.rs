//! Classified netlink errors: whether the request was sent, refused by the kernel, or left
//! without a clear answer (in which case the caller must assume it may have taken effect).

use std::io;

use super::codec::DecodeError;

/// Why a request that was sent has no clear outcome.
#[derive(Debug, thiserror::Error)]
pub enum AmbiguousCause {
    /// Receiving the answer failed (including the receive timeout).
    #[error("receiving the answer failed")]
    Io(#[source] io::Error),
    /// The answer could not be decoded.
    #[error("the answer is malformed")]
    Decode(#[from] DecodeError),
    /// The answer was well-formed but not what the command returns.
    #[error("unexpected answer: {0}")]
    Unexpected(&'static str),
}

/// The outcome of a failed netlink request, classified for the caller's cleanup decisions.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The request never reached the kernel: nothing changed.
    #[error("netlink request not sent")]
    NotSent(#[source] io::Error),
    /// The kernel received the request and refused it with this errno: nothing changed.
    #[error("the kernel refused the request: {} (errno {errno})", io::Error::from_raw_os_error(*errno))]
    Refused {
        /// The positive errno from the kernel's `NLMSG_ERROR`.
        errno: i32,
    },
    /// The request was sent but its outcome is unknown: it may have taken effect.
    #[error("netlink request sent but its outcome is unknown")]
    Ambiguous(#[source] AmbiguousCause),
}

impl NlError {
    /// The errno for metrics and for callers mapping to `io::Error`: the kernel's errno when it
    /// refused, the I/O error's errno when not sent, `ETIMEDOUT`/`EPROTO` when ambiguous.
    pub fn errno(&self) -> i32 {
        match self {
            NlError::NotSent(e) => e.raw_os_error().unwrap_or(libc::EIO),
            NlError::Refused { errno } => *errno,
            NlError::Ambiguous(AmbiguousCause::Io(e)) => {
                e.raw_os_error().unwrap_or(libc::ETIMEDOUT)
            }
            NlError::Ambiguous(_) => libc::EPROTO,
        }
    }

    /// Whether the request may have taken effect (so the caller must undo it to be safe).
    pub fn may_have_taken_effect(&self) -> bool {
        matches!(self, NlError::Ambiguous(_))
    }
}

/// An error and its sources, joined with `: ` (for logs and reports; the `Display` of rootfork's
/// errors never repeats its source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
