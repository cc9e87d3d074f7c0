//! A generic netlink request/answer client over a [`Transport`]: numbers requests, asks for an
//! acknowledgement, skips stale datagrams whose sequence number is not the request's, collects the
//! answer messages and classifies failures ([`NlError`]).

use std::io;
use std::time::{Duration, Instant};

use super::codec::{
    Attrs, MessageBuilder, Messages, GENL_HDRLEN, GENL_ID_CTRL, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK,
    NLM_F_REQUEST,
};
use super::error::{AmbiguousCause, NlError};
use super::transport::Transport;

const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_VERSION: u8 = 1;
/// Receive buffer: the kernel never sends generic netlink datagrams larger than a page-ish
/// `NLMSG_GOODSIZE` for these families; 64 KiB leaves ample room.
const RECV_BUF: usize = 64 * 1024;

/// One generic netlink answer message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The command in the answer's `genlmsghdr`.
    pub cmd: u8,
    /// The answer's attributes, undecoded.
    pub attrs: Vec<u8>,
}

impl Reply {
    /// The attributes as an iterator.
    pub fn attrs(&self) -> Attrs<'_> {
        Attrs::new(&self.attrs)
    }
}

/// A generic netlink client.
#[derive(Debug)]
pub struct GenlClient<T> {
    transport: T,
    seq: u32,
    deadline: Duration,
}

impl<T: Transport> GenlClient<T> {
    /// A client over `transport`; a request without a final answer after `deadline` (counted
    /// across all the datagrams it receives) is ambiguous.
    pub fn new(transport: T, deadline: Duration) -> Self {
        // Start from a per-process value so answers to another process's socket never match.
        let seq = std::process::id().wrapping_mul(7919);
        GenlClient {
            transport,
            seq,
            deadline,
        }
    }

    /// Sends `cmd` to `family` with attributes added by `build`, and returns every answer message
    /// that came before the acknowledgement.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        build: impl FnOnce(&mut MessageBuilder),
    ) -> Result<Vec<Reply>, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = MessageBuilder::genl(family, NLM_F_REQUEST | NLM_F_ACK, seq, cmd, version);
        build(&mut msg);
        let msg = msg.finish();
        self.transport.send(&msg).map_err(NlError::NotSent)?;

        let started = Instant::now();
        let mut buf = vec![0u8; RECV_BUF];
        let mut replies = Vec::new();
        loop {
            if started.elapsed() > self.deadline {
                return Err(NlError::Ambiguous(AmbiguousCause::Io(io::Error::from(
                    io::ErrorKind::TimedOut,
                ))));
            }
            let n = self
                .transport
                .recv(&mut buf)
                .map_err(|e| NlError::Ambiguous(AmbiguousCause::Io(e)))?;
            for m in Messages::new(&buf[..n]) {
                let m = m.map_err(|e| NlError::Ambiguous(e.into()))?;
                if m.seq != seq {
                    // A late answer to an earlier request that timed out: not ours.
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => {
                        let code = m.error_code().map_err(|e| NlError::Ambiguous(e.into()))?;
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(NlError::Refused {
                            errno: code.checked_neg().unwrap_or(libc::EIO),
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    ty if ty == family => {
                        let (cmd, _, _) = m.genl().map_err(|e| NlError::Ambiguous(e.into()))?;
                        replies.push(Reply {
                            cmd,
                            attrs: m.payload[GENL_HDRLEN..].to_vec(),
                        });
                    }
                    _ => {
                        return Err(NlError::Ambiguous(AmbiguousCause::Unexpected(
                            "answer of another message type",
                        )))
                    }
                }
            }
        }
    }

    /// Resolves a generic netlink family name to its id (`CTRL_CMD_GETFAMILY`). A missing
    /// family (module not loaded) is `Refused { errno: ENOENT }`.
    pub fn resolve_family(&mut self, name: &str) -> Result<u16, NlError> {
        let replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, |m| {
            m.string(CTRL_ATTR_FAMILY_NAME, name);
        })?;
        for r in &replies {
            if let Some(id) = r
                .attrs()
                .find(CTRL_ATTR_FAMILY_ID)
                .map_err(|e| NlError::Ambiguous(e.into()))?
            {
                return id.as_u16().map_err(|e| NlError::Ambiguous(e.into()));
            }
        }
        Err(NlError::Ambiguous(AmbiguousCause::Unexpected(
            "GETFAMILY answer without a family id",
        )))
    }
}
