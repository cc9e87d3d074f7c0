//! The seam between the netlink client and the socket: [`Transport`] sends and receives whole
//! datagrams; [`NetlinkSocket`] is the real `AF_NETLINK`/`NETLINK_GENERIC` socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// Sends and receives netlink datagrams.
pub trait Transport: Send {
    /// Sends one datagram (one or more messages).
    fn send(&mut self, datagram: &[u8]) -> io::Result<()>;

    /// Receives one datagram into `buf`, returning its length. A receive timeout is an error of
    /// kind `WouldBlock` or `TimedOut`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A generic netlink socket bound to the kernel, with a receive timeout.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    /// Opens a `NETLINK_GENERIC` socket whose receives time out after `timeout`.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::from(duration_to_timeval(timeout)),
        )?;
        // Large enough for a STATUS answer listing many devices.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        Ok(NetlinkSocket { fd })
    }
}

fn duration_to_timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

impl Transport for NetlinkSocket {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let n = send(self.fd.as_fd().as_raw_fd(), datagram, MsgFlags::empty())?;
        if n != datagram.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        loop {
            match recv(self.fd.as_fd().as_raw_fd(), buf, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(n) => return Ok(n),
            }
        }
    }
}
