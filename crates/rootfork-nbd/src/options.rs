//! Parsers for the payloads of handshake options (`INFO`/`GO`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT`): pure functions over bytes, total on any input (fuzzed).

use crate::request::{be16, be32};

/// Longest export name or metadata query accepted (the protocol's limit is 4096 bytes).
pub const MAX_STRING: usize = 4096;

/// Why an option payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Lengths inconsistent with the payload, or a string that is not UTF-8.
    #[error("malformed option payload")]
    Invalid,
    /// A string longer than [`MAX_STRING`].
    #[error("string too long")]
    TooBig,
}

/// An `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// The information types asked for.
    pub infos: Vec<u16>,
}

/// A `LIST_META_CONTEXT` / `SET_META_CONTEXT` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export name.
    pub export: String,
    /// The queries.
    pub queries: Vec<String>,
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.b.len() < n {
            return Err(OptionError::Invalid);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(be32)
    }
    fn string(&mut self) -> Result<String, OptionError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            // Consistent lengths first: a lie about the length is Invalid, not TooBig.
            if n > self.b.len() {
                return Err(OptionError::Invalid);
            }
            return Err(OptionError::TooBig);
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| OptionError::Invalid)
    }
}

/// Parses an `INFO` / `GO` payload.
pub fn parse_info(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor { b: data };
    let name = c.string()?;
    let n = c.u16()? as usize;
    if c.b.len() != 2 * n {
        return Err(OptionError::Invalid);
    }
    let infos = (0..n).map(|_| c.u16()).collect::<Result<_, _>>()?;
    Ok(InfoRequest { name, infos })
}

/// Parses a `LIST_META_CONTEXT` / `SET_META_CONTEXT` payload.
pub fn parse_meta(data: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor { b: data };
    let export = c.string()?;
    let n = c.u32()? as usize;
    // Every query takes at least its 4-byte length.
    if n > c.b.len() / 4 {
        return Err(OptionError::Invalid);
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string()?);
    }
    if !c.b.is_empty() {
        return Err(OptionError::Invalid);
    }
    Ok(MetaRequest { export, queries })
}

/// Encodes an `INFO` / `GO` payload (tests and clients).
pub fn encode_info(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Encodes a meta context payload (tests and clients).
pub fn encode_meta(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}
