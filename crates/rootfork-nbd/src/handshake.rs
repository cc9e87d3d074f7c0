//! The fixed-newstyle handshake (socket mode): option haggling up to `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`.
//!
//! [`negotiate`] is generic over `Read + Write`, reads exactly the bytes each option occupies
//! (so nothing of the transmission phase is consumed), and answers every option: unknown ones get
//! `ERR_UNSUP`, malformed ones `ERR_INVALID`, `STARTTLS` `ERR_POLICY` (no TLS configured). Unknown
//! client flags, a wrong option magic or an unknown `EXPORT_NAME` end the handshake.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use rootfork_block::BlockDevice;

use crate::consts::*;
use crate::kernel::base_flags;
use crate::meta::MetaContext;
use crate::options::{parse_info, parse_meta, OptionError};
use crate::opts::ServeOptions;
use crate::reply::Framing;
use crate::request::Limits;

/// Largest option payload read; longer ones are skipped and answered `ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// A named export.
pub struct Export {
    /// Its name (`""` is the default export clients get when they ask for no name).
    pub name: String,
    /// A human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .finish()
    }
}

/// The exports a handshake may choose from.
pub trait ExportSet {
    /// The export of this name. An empty name falls back to the only export, if there is one.
    fn find(&self, name: &str) -> Option<Arc<Export>>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<Arc<Export>>;
}

impl ExportSet for BTreeMap<String, Arc<Export>> {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.get(name).cloned().or_else(|| {
            if name.is_empty() && self.len() == 1 {
                self.values().next().cloned()
            } else {
                None
            }
        })
    }
    fn list(&self) -> Vec<Arc<Export>> {
        self.values().cloned().collect()
    }
}

/// What a successful handshake agreed on.
#[derive(Debug)]
pub struct Session {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Reply framing.
    pub framing: Framing,
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
    /// Transmission flags sent.
    pub flags: u16,
}

impl Session {
    /// Validation limits for the transmission phase.
    pub fn limits(&self, opts: &ServeOptions) -> Limits {
        Limits {
            size: self.export.device.size(),
            min_block: opts.min_block_size,
            max_payload: opts.max_payload,
            max_write: opts.write_limit(),
            read_only: self.export.device.is_read_only(),
            structured: self.framing.structured,
            extended: self.framing.extended,
            has_meta: !self.contexts.is_empty(),
        }
    }
}

/// Why a handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The stream failed or ended.
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    /// The client sent flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` payload over the limit.
    #[error("export name too long")]
    ExportNameTooLong,
    /// A client without fixed newstyle sent an option other than `EXPORT_NAME`.
    #[error("option {0} from a client without fixed newstyle")]
    NotFixed(u32),
}

fn reply<S: Write>(io: &mut S, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    io.write_all(&v)?;
    io.flush()
}

fn read_u32<S: Read>(io: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    io.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<S: Read>(io: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    io.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn skip<S: Read>(io: &mut S, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut io.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn flags_for(export: &Export, framing: Framing) -> u16 {
    let mut f = base_flags(export.device.is_read_only());
    if framing.structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

fn opt_error_code(e: OptionError) -> u32 {
    match e {
        OptionError::Invalid => REP_ERR_INVALID,
        OptionError::TooBig => REP_ERR_TOO_BIG,
    }
}

/// Runs the server side of the handshake. `Ok(None)`: the client aborted (`NBD_OPT_ABORT`) or
/// closed the stream between options.
pub fn negotiate<S: Read + Write>(
    io: &mut S,
    exports: &dyn ExportSet,
    opts: &ServeOptions,
) -> Result<Option<Session>, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello)?;
    io.flush()?;
    let cflags = read_u32(io)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(cflags));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut framing = Framing::default();
    // (export name the contexts were set for, contexts)
    let mut meta: Option<(String, Vec<MetaContext>)> = None;

    loop {
        let magic = match read_u64(io) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let opt = read_u32(io)?;
        let len = read_u32(io)?;
        if !fixed && opt != OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixed(opt));
        }
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameTooLong);
            }
            skip(io, u64::from(len))?;
            reply(io, opt, REP_ERR_TOO_BIG, &[])?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data)?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = exports.find(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let flags = flags_for(&export, framing);
                let mut v = Vec::with_capacity(10 + 124);
                v.extend_from_slice(&export.device.size().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&v)?;
                io.flush()?;
                let contexts = select(&meta, &export.name);
                return Ok(Some(Session {
                    export,
                    framing,
                    contexts,
                    flags,
                }));
            }
            OPT_ABORT => {
                // The client may already be gone; the answer is a courtesy.
                let _ = reply(io, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    reply(io, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                for e in exports.list() {
                    let mut v = Vec::with_capacity(4 + e.name.len());
                    v.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    v.extend_from_slice(e.name.as_bytes());
                    reply(io, opt, REP_SERVER, &v)?;
                }
                reply(io, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => reply(io, opt, REP_ERR_POLICY, &[])?,
            OPT_INFO | OPT_GO => {
                let req = match parse_info(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(io, opt, opt_error_code(e), &[])?;
                        continue;
                    }
                };
                let Some(export) = exports.find(&req.name) else {
                    reply(io, opt, REP_ERR_UNKNOWN, &[])?;
                    continue;
                };
                let flags = flags_for(&export, framing);
                let mut v = Vec::with_capacity(12);
                v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                v.extend_from_slice(&export.device.size().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                reply(io, opt, REP_INFO, &v)?;
                if req.infos.contains(&INFO_NAME) {
                    let mut v = INFO_NAME.to_be_bytes().to_vec();
                    v.extend_from_slice(export.name.as_bytes());
                    reply(io, opt, REP_INFO, &v)?;
                }
                if req.infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    v.extend_from_slice(export.description.as_bytes());
                    reply(io, opt, REP_INFO, &v)?;
                }
                // Sent whether asked or not: clients that know it honour the maximum.
                let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                v.extend_from_slice(&opts.min_block_size.max(1).to_be_bytes());
                v.extend_from_slice(&opts.preferred_block_size.to_be_bytes());
                v.extend_from_slice(&opts.max_payload.to_be_bytes());
                reply(io, opt, REP_INFO, &v)?;
                reply(io, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    let contexts = select(&meta, &export.name);
                    return Ok(Some(Session {
                        export,
                        framing,
                        contexts,
                        flags,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                let code = if len != 0 {
                    REP_ERR_INVALID
                } else if framing.extended {
                    REP_ERR_EXT_HEADER_REQD
                } else if framing.structured {
                    REP_ERR_INVALID
                } else {
                    framing.structured = true;
                    REP_ACK
                };
                reply(io, opt, code, &[])?;
            }
            OPT_EXTENDED_HEADERS => {
                let code = if len != 0 || framing.extended {
                    REP_ERR_INVALID
                } else {
                    framing.structured = true;
                    framing.extended = true;
                    REP_ACK
                };
                reply(io, opt, code, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !framing.structured {
                    reply(io, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                let req = match parse_meta(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(io, opt, opt_error_code(e), &[])?;
                        continue;
                    }
                };
                let Some(export) = exports.find(&req.export) else {
                    reply(io, opt, REP_ERR_UNKNOWN, &[])?;
                    continue;
                };
                let mut found: Vec<MetaContext> = Vec::new();
                if set {
                    for q in &req.queries {
                        found.extend(MetaContext::by_name(q));
                    }
                } else if req.queries.is_empty() {
                    found.extend(MetaContext::ALL);
                } else {
                    for q in &req.queries {
                        found.extend(MetaContext::matching(q));
                    }
                }
                let mut seen = Vec::new();
                for c in found {
                    if seen.contains(&c) {
                        continue;
                    }
                    seen.push(c);
                    let mut v = c.id().to_be_bytes().to_vec();
                    v.extend_from_slice(c.name().as_bytes());
                    reply(io, opt, REP_META_CONTEXT, &v)?;
                }
                reply(io, opt, REP_ACK, &[])?;
                if set {
                    meta = Some((export.name.clone(), seen));
                }
            }
            _ => reply(io, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// The contexts selected for `export` (none if they were set for another export).
fn select(meta: &Option<(String, Vec<MetaContext>)>, export: &str) -> Vec<MetaContext> {
    match meta {
        Some((name, ctx)) if name == export => ctx.clone(),
        _ => Vec::new(),
    }
}
