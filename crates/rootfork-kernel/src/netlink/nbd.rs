//! The kernel's generic netlink `nbd` family (`linux/nbd-netlink.h`): request types, their
//! encoding, and [`NbdNetlink`], the client that the attachment and reclaim code use through the
//! [`NbdControl`] seam.

use std::os::fd::RawFd;
use std::time::Duration;

use parking_lot::Mutex;

use super::client::{GenlClient, Reply};
use super::codec::MessageBuilder;
use super::error::{AmbiguousCause, NlError};
use super::transport::{NetlinkSocket, Transport};

/// `NBD_GENL_FAMILY_NAME`.
pub const FAMILY_NAME: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const FAMILY_VERSION: u8 = 1;

/// `NBD_CMD_*` commands.
pub mod cmd {
    /// Configure and start a device.
    pub const CONNECT: u8 = 1;
    /// Stop a device.
    pub const DISCONNECT: u8 = 2;
    /// Change a running device's timeouts, flags or sockets.
    pub const RECONFIGURE: u8 = 3;
    /// Multicast notification: a connection of a device died.
    pub const LINK_DEAD: u8 = 4;
    /// List devices and whether they are connected.
    pub const STATUS: u8 = 5;
}

/// `NBD_ATTR_*` attributes.
pub mod attr {
    /// u32 device index.
    pub const INDEX: u16 = 1;
    /// u64 device size in bytes.
    pub const SIZE_BYTES: u16 = 2;
    /// u64 logical block size in bytes.
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// u64 request timeout in seconds.
    pub const TIMEOUT: u16 = 4;
    /// u64 NBD transmission flags (`NBD_FLAG_*`).
    pub const SERVER_FLAGS: u16 = 5;
    /// u64 client flags (`NBD_CFLAG_*`).
    pub const CLIENT_FLAGS: u16 = 6;
    /// Nested list of [`SOCK_ITEM`](super::sock::ITEM).
    pub const SOCKETS: u16 = 7;
    /// u64 seconds to wait for a dead connection to be replaced.
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    /// Nested list of [`DEVICE_ITEM`](super::device::ITEM) (STATUS answers).
    pub const DEVICE_LIST: u16 = 9;
    /// String naming the backend; shown in `/sys/block/nbdN/backend`.
    pub const BACKEND_IDENTIFIER: u16 = 10;
}

/// `NBD_SOCK_*` attributes inside [`attr::SOCKETS`].
pub mod sock {
    /// One socket (nested).
    pub const ITEM: u16 = 1;
    /// u32 file descriptor of the socket, in the sender's fd table.
    pub const FD: u16 = 1;
}

/// `NBD_DEVICE_*` attributes inside [`attr::DEVICE_LIST`].
pub mod device {
    /// One device (nested).
    pub const ITEM: u16 = 1;
    /// u32 index.
    pub const INDEX: u16 = 1;
    /// u8 connected.
    pub const CONNECTED: u16 = 2;
}

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// `NBD_CFLAG_DISCONNECT_ON_CLOSE`.
pub const CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The device index, or `None` to let the kernel pick (rootfork always names one: the slot
    /// it holds the claim for).
    pub index: Option<u32>,
    /// Device size in bytes.
    pub size_bytes: u64,
    /// Logical block size in bytes (the driver sets the physical block size to it as well;
    /// rootfork uses 512 by default, `AttachOptions::block_size`).
    pub block_size_bytes: u64,
    /// Request timeout in seconds (must exceed the worst backend latency).
    pub timeout_secs: u64,
    /// Seconds the kernel waits for a dead connection to come back, if set.
    pub dead_conn_timeout_secs: Option<u64>,
    /// NBD transmission flags of the export.
    pub server_flags: u64,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// Connected stream sockets, one per kernel connection (fd numbers in this process).
    pub sockets: Vec<RawFd>,
    /// The backend identifier shown in sysfs.
    pub backend_identifier: Option<String>,
}

impl ConnectRequest {
    /// Adds this request's attributes to a message.
    pub fn encode(&self, m: &mut MessageBuilder) {
        if let Some(i) = self.index {
            m.u32(attr::INDEX, i);
        }
        m.u64(attr::SIZE_BYTES, self.size_bytes);
        m.u64(attr::BLOCK_SIZE_BYTES, self.block_size_bytes);
        m.u64(attr::TIMEOUT, self.timeout_secs);
        if let Some(t) = self.dead_conn_timeout_secs {
            m.u64(attr::DEAD_CONN_TIMEOUT, t);
        }
        m.u64(attr::SERVER_FLAGS, self.server_flags);
        m.u64(attr::CLIENT_FLAGS, self.client_flags);
        let socks = m.begin_nested(attr::SOCKETS);
        for &fd in &self.sockets {
            let item = m.begin_nested(sock::ITEM);
            m.u32(sock::FD, fd as u32);
            m.end_nested(item);
        }
        m.end_nested(socks);
        if let Some(id) = &self.backend_identifier {
            m.string(attr::BACKEND_IDENTIFIER, id);
        }
    }
}

/// What `NBD_CMD_RECONFIGURE` changes on a running device (unset fields stay as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigureRequest {
    /// The device index.
    pub index: u32,
    /// New request timeout in seconds.
    pub timeout_secs: Option<u64>,
    /// New dead-connection timeout in seconds.
    pub dead_conn_timeout_secs: Option<u64>,
    /// New client flags.
    pub client_flags: Option<u64>,
    /// Replacement sockets for dead connections.
    pub sockets: Vec<RawFd>,
    /// The device's backend identifier: the kernel refuses (`EINVAL`, "must specify backend")
    /// to reconfigure a device connected with one unless the request names the same one.
    pub backend_identifier: Option<String>,
}

/// One device from a STATUS answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStatus {
    /// Device index.
    pub index: u32,
    /// Whether the kernel has it configured and connected.
    pub connected: bool,
}

/// The operations the rest of the crate needs from the `nbd` family; a seam for fakes.
pub trait NbdControl: Send + Sync {
    /// `NBD_CMD_CONNECT`; returns the device index the kernel configured.
    fn connect(&self, req: &ConnectRequest) -> Result<u32, NlError>;
    /// `NBD_CMD_DISCONNECT` of device `index`.
    fn disconnect(&self, index: u32) -> Result<(), NlError>;
    /// `NBD_CMD_RECONFIGURE`.
    fn reconfigure(&self, req: &ReconfigureRequest) -> Result<(), NlError>;
    /// `NBD_CMD_STATUS` of one device or (with `None`) of all.
    fn status(&self, index: Option<u32>) -> Result<Vec<DeviceStatus>, NlError>;
}

/// The `nbd` family over a netlink [`Transport`].
#[derive(Debug)]
pub struct NbdNetlink<T> {
    client: Mutex<GenlClient<T>>,
    family: u16,
}

impl NbdNetlink<NetlinkSocket> {
    /// Opens a netlink socket and resolves the `nbd` family. Fails with
    /// `Refused { errno: ENOENT }` when the `nbd` module is not loaded.
    pub fn open(timeout: Duration) -> Result<Self, NlError> {
        let sock = NetlinkSocket::open(timeout).map_err(NlError::NotSent)?;
        Self::with_transport(sock, timeout)
    }
}

impl<T: Transport> NbdNetlink<T> {
    /// Resolves the family over `transport`.
    pub fn with_transport(transport: T, timeout: Duration) -> Result<Self, NlError> {
        let mut client = GenlClient::new(transport, timeout);
        let family = client.resolve_family(FAMILY_NAME)?;
        Ok(NbdNetlink {
            client: Mutex::new(client),
            family,
        })
    }

    /// The resolved family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    fn request(
        &self,
        cmd: u8,
        build: impl FnOnce(&mut MessageBuilder),
    ) -> Result<Vec<Reply>, NlError> {
        self.client
            .lock()
            .request(self.family, cmd, FAMILY_VERSION, build)
    }
}

fn decode_err(e: super::codec::DecodeError) -> NlError {
    NlError::Ambiguous(AmbiguousCause::Decode(e))
}

/// Reads the device index from a CONNECT answer.
fn connect_index(replies: &[Reply], asked: Option<u32>) -> Result<u32, NlError> {
    for r in replies {
        if let Some(a) = r.attrs().find(attr::INDEX).map_err(decode_err)? {
            let got = a.as_u32().map_err(decode_err)?;
            if asked.is_some_and(|i| i != got) {
                return Err(NlError::Ambiguous(AmbiguousCause::Unexpected(
                    "CONNECT answered with another device index",
                )));
            }
            return Ok(got);
        }
    }
    asked.ok_or(NlError::Ambiguous(AmbiguousCause::Unexpected(
        "CONNECT acknowledged without a device index",
    )))
}

/// Decodes the devices of STATUS answers.
pub fn decode_status(replies: &[Reply]) -> Result<Vec<DeviceStatus>, NlError> {
    let mut out = Vec::new();
    for r in replies {
        let Some(list) = r.attrs().find(attr::DEVICE_LIST).map_err(decode_err)? else {
            continue;
        };
        for item in list.nested() {
            let item = item.map_err(decode_err)?;
            if item.ty != device::ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = false;
            for a in item.nested() {
                let a = a.map_err(decode_err)?;
                match a.ty {
                    device::INDEX => index = Some(a.as_u32().map_err(decode_err)?),
                    device::CONNECTED => connected = a.as_u8().map_err(decode_err)? != 0,
                    _ => {}
                }
            }
            let index = index.ok_or(NlError::Ambiguous(AmbiguousCause::Unexpected(
                "STATUS device item without an index",
            )))?;
            out.push(DeviceStatus { index, connected });
        }
    }
    Ok(out)
}

impl<T: Transport> NbdControl for NbdNetlink<T> {
    fn connect(&self, req: &ConnectRequest) -> Result<u32, NlError> {
        let replies = self.request(cmd::CONNECT, |m| req.encode(m))?;
        connect_index(&replies, req.index)
    }

    fn disconnect(&self, index: u32) -> Result<(), NlError> {
        self.request(cmd::DISCONNECT, |m| {
            m.u32(attr::INDEX, index);
        })
        .map(drop)
    }

    fn reconfigure(&self, req: &ReconfigureRequest) -> Result<(), NlError> {
        self.request(cmd::RECONFIGURE, |m| {
            m.u32(attr::INDEX, req.index);
            if let Some(t) = req.timeout_secs {
                m.u64(attr::TIMEOUT, t);
            }
            if let Some(t) = req.dead_conn_timeout_secs {
                m.u64(attr::DEAD_CONN_TIMEOUT, t);
            }
            if let Some(f) = req.client_flags {
                m.u64(attr::CLIENT_FLAGS, f);
            }
            if let Some(id) = &req.backend_identifier {
                m.string(attr::BACKEND_IDENTIFIER, id);
            }
            if !req.sockets.is_empty() {
                let socks = m.begin_nested(attr::SOCKETS);
                for &fd in &req.sockets {
                    let item = m.begin_nested(sock::ITEM);
                    m.u32(sock::FD, fd as u32);
                    m.end_nested(item);
                }
                m.end_nested(socks);
            }
        })
        .map(drop)
    }

    fn status(&self, index: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
        let replies = self.request(cmd::STATUS, |m| {
            if let Some(i) = index {
                m.u32(attr::INDEX, i);
            }
        })?;
        decode_status(&replies)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;

    use super::*;
    use crate::netlink::codec::{Attrs, Messages, GENL_ID_CTRL, NLMSG_ERROR};

    const FAMILY: u16 = 0x1a;

    /// A scripted kernel: answers each sent request with the datagrams `handler` returns.
    type Handler = Box<dyn FnMut(&Request) -> io::Result<Vec<Vec<u8>>> + Send>;

    struct Request {
        ty: u16,
        seq: u32,
        cmd: u8,
        attrs: Vec<u8>,
    }

    struct FakePeer {
        handler: Handler,
        queue: VecDeque<Vec<u8>>,
        sent: std::sync::Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    }

    impl Transport for FakePeer {
        fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
            let m = Messages::new(datagram).next().unwrap().unwrap();
            let (cmd, _, attrs) = m.genl().unwrap();
            let _ = attrs;
            let req = Request {
                ty: m.ty,
                seq: m.seq,
                cmd,
                attrs: m.payload[4..].to_vec(),
            };
            let answers = (self.handler)(&req)?;
            self.sent.lock().push(datagram.to_vec());
            self.queue.extend(answers);
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let d = self
                .queue
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            buf[..d.len()].copy_from_slice(&d);
            Ok(d.len())
        }
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&36u32.to_ne_bytes());
        v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(-errno).to_ne_bytes());
        v.extend_from_slice(&[0u8; 16]);
        v
    }

    fn reply(family: u16, seq: u32, cmd: u8, build: impl FnOnce(&mut MessageBuilder)) -> Vec<u8> {
        let mut m = MessageBuilder::genl(family, 0, seq, cmd, 1);
        build(&mut m);
        m.finish()
    }

    /// A peer that resolves the family and then hands requests to `then`.
    fn peer(
        mut then: impl FnMut(&Request) -> io::Result<Vec<Vec<u8>>> + Send + 'static,
    ) -> (FakePeer, std::sync::Arc<parking_lot::Mutex<Vec<Vec<u8>>>>) {
        let sent = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let p = FakePeer {
            handler: Box::new(move |r: &Request| {
                if r.ty == GENL_ID_CTRL {
                    let name = Attrs::new(&r.attrs).find(2).unwrap().unwrap().as_string();
                    if name != "nbd" {
                        return Ok(vec![ack(r.seq, libc::ENOENT)]);
                    }
                    return Ok(vec![
                        reply(GENL_ID_CTRL, r.seq, 1, |m| {
                            m.string(2, "nbd").u16(1, FAMILY).u32(3, 1);
                        }),
                        ack(r.seq, 0),
                    ]);
                }
                assert_eq!(r.ty, FAMILY);
                then(r)
            }),
            queue: VecDeque::new(),
            sent: sent.clone(),
        };
        (p, sent)
    }

    fn request() -> ConnectRequest {
        ConnectRequest {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            timeout_secs: 30,
            dead_conn_timeout_secs: Some(5),
            server_flags: 0x1 | 0x4,
            client_flags: 0,
            sockets: vec![7, 9],
            backend_identifier: Some("rootfork:h:1:s".into()),
        }
    }

    #[test]
    fn connect_request_matches_golden_bytes() {
        let mut m = MessageBuilder::genl(FAMILY, 5, 2, cmd::CONNECT, 1);
        request().encode(&mut m);
        let got = m.finish();
        #[rustfmt::skip]
        let golden: Vec<u8> = [
            &[148u8, 0, 0, 0, 0x1a, 0, 5, 0, 2, 0, 0, 0, 0, 0, 0, 0][..],
            &[1, 1, 0, 0],
            &[8, 0, 1, 0, 3, 0, 0, 0],                      // INDEX 3
            &[12, 0, 2, 0, 0, 0, 0, 0x40, 0, 0, 0, 0],      // SIZE 1 GiB
            &[12, 0, 3, 0, 0, 0x10, 0, 0, 0, 0, 0, 0],      // BLOCK_SIZE 4096
            &[12, 0, 4, 0, 30, 0, 0, 0, 0, 0, 0, 0],        // TIMEOUT 30
            &[12, 0, 8, 0, 5, 0, 0, 0, 0, 0, 0, 0],         // DEAD_CONN_TIMEOUT 5
            &[12, 0, 5, 0, 5, 0, 0, 0, 0, 0, 0, 0],         // SERVER_FLAGS
            &[12, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0],         // CLIENT_FLAGS
            &[28, 0, 7, 0x80],                              // SOCKETS (nested)
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 7, 0, 0, 0],      //   ITEM { FD 7 }
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 9, 0, 0, 0],      //   ITEM { FD 9 }
            &[19, 0, 10, 0], b"rootfork:h:1:s\0", &[0],    // BACKEND_IDENTIFIER, padded
        ].concat();
        assert_eq!(got, golden);
    }

    #[test]
    fn resolves_family_and_connects() {
        let (p, sent) = peer(|r| {
            assert_eq!(r.cmd, cmd::CONNECT);
            let a = Attrs::new(&r.attrs);
            assert_eq!(a.find(attr::INDEX).unwrap().unwrap().as_u32(), Ok(3));
            Ok(vec![
                reply(FAMILY, r.seq, cmd::CONNECT, |m| {
                    m.u32(attr::INDEX, 3);
                }),
                ack(r.seq, 0),
            ])
        });
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        assert_eq!(nl.family(), FAMILY);
        assert_eq!(nl.connect(&request()).unwrap(), 3);
        assert_eq!(sent.lock().len(), 2);
    }

    #[test]
    fn missing_family_is_refused_enoent() {
        let sent = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let p = FakePeer {
            handler: Box::new(|r: &Request| Ok(vec![ack(r.seq, libc::ENOENT)])),
            queue: VecDeque::new(),
            sent,
        };
        let Err(err) = NbdNetlink::with_transport(p, Duration::from_secs(1)) else {
            panic!("resolved a missing family");
        };
        assert!(matches!(err, NlError::Refused { errno } if errno == libc::ENOENT));
    }

    #[test]
    fn kernel_refusal_is_classified_with_errno() {
        let (p, _) = peer(|r| Ok(vec![ack(r.seq, libc::EBUSY)]));
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        let err = nl.connect(&request()).unwrap_err();
        assert!(matches!(err, NlError::Refused { errno } if errno == libc::EBUSY));
        assert!(!err.may_have_taken_effect());
        assert_eq!(err.errno(), libc::EBUSY);
    }

    #[test]
    fn send_failure_is_not_sent() {
        let (p, _) = peer(|_| Err(io::Error::from_raw_os_error(libc::ENOBUFS)));
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        let err = nl.disconnect(1).unwrap_err();
        assert!(matches!(err, NlError::NotSent(_)));
        assert_eq!(err.errno(), libc::ENOBUFS);
    }

    #[test]
    fn silence_after_sending_is_ambiguous() {
        let (p, _) = peer(|_| Ok(vec![]));
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        let err = nl.connect(&request()).unwrap_err();
        assert!(err.may_have_taken_effect(), "{err}");
    }

    #[test]
    fn garbage_answer_is_ambiguous() {
        let (p, _) = peer(|r| {
            let mut bad = ack(r.seq, 0);
            bad.truncate(18);
            bad[0] = 18;
            Ok(vec![bad])
        });
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        assert!(nl.disconnect(0).unwrap_err().may_have_taken_effect());
    }

    #[test]
    fn stale_answers_are_skipped_by_sequence_number() {
        let (p, _) = peer(|r| {
            Ok(vec![
                ack(r.seq.wrapping_sub(1), libc::EBUSY),
                reply(FAMILY, r.seq.wrapping_sub(1), cmd::CONNECT, |m| {
                    m.u32(attr::INDEX, 9);
                }),
                ack(r.seq, 0),
            ])
        });
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        // The stale refusal and stale index are ignored; the ack without an index answers the
        // index we asked for.
        assert_eq!(nl.connect(&request()).unwrap(), 3);
    }

    #[test]
    fn connect_answer_with_other_index_is_ambiguous() {
        let (p, _) = peer(|r| {
            Ok(vec![
                reply(FAMILY, r.seq, cmd::CONNECT, |m| {
                    m.u32(attr::INDEX, 4);
                }),
                ack(r.seq, 0),
            ])
        });
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        assert!(nl.connect(&request()).unwrap_err().may_have_taken_effect());
    }

    #[test]
    fn status_decodes_device_list() {
        let (p, _) = peer(|r| {
            assert_eq!(r.cmd, cmd::STATUS);
            Ok(vec![
                reply(FAMILY, r.seq, cmd::STATUS, |m| {
                    let list = m.begin_nested(attr::DEVICE_LIST);
                    for (i, c) in [(0u32, 1u8), (1, 0), (2, 1)] {
                        let it = m.begin_nested(device::ITEM);
                        m.u32(device::INDEX, i).u8(device::CONNECTED, c);
                        m.end_nested(it);
                    }
                    m.end_nested(list);
                }),
                ack(r.seq, 0),
            ])
        });
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        let st = nl.status(None).unwrap();
        assert_eq!(
            st,
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                },
                DeviceStatus {
                    index: 2,
                    connected: true
                },
            ]
        );
    }

    #[test]
    fn reconfigure_encodes_only_set_fields() {
        let (p, sent) = peer(|r| Ok(vec![ack(r.seq, 0)]));
        let nl = NbdNetlink::with_transport(p, Duration::from_secs(1)).unwrap();
        nl.reconfigure(&ReconfigureRequest {
            index: 2,
            timeout_secs: Some(60),
            ..Default::default()
        })
        .unwrap();
        let sent = sent.lock();
        let last = sent.last().unwrap();
        assert_eq!(&last[..8], &[40u8, 0, 0, 0, 0x1a, 0, 5, 0]);
        assert_eq!(
            &last[16..],
            &[3, 1, 0, 0, 8, 0, 1, 0, 2, 0, 0, 0, 12, 0, 4, 0, 60, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
