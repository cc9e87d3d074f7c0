//! Build identifiers: random 128-bit ids, written as 32 lowercase hex digits.
//!
//! A build id names one immutable build (its data file and its map) everywhere: in a local store
//! directory, in object storage keys and in the lineage table of every layer above it. Ids are
//! random rather than content hashes so a build can be named before its data is fully written.

use std::fmt;
use std::str::FromStr;

use super::error::LayerError;

/// The id of one build.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildId([u8; 16]);

impl BuildId {
    /// A fresh random id from the kernel's random source (never all zeroes: the zero id means
    /// "no parent" on disk).
    pub fn random() -> Self {
        let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom is readable");
        loop {
            let mut b = [0u8; 16];
            std::io::Read::read_exact(&mut f, &mut b).expect("/dev/urandom gives bytes");
            if let Some(id) = BuildId::from_bytes(b) {
                return id;
            }
        }
    }

    /// The id's raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// An id from raw bytes; `None` for the all-zero bytes, which mean "no build".
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        if bytes == [0; 16] {
            None
        } else {
            Some(BuildId(bytes))
        }
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildId({self})")
    }
}

impl FromStr for BuildId {
    type Err = LayerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LayerError::BadBuildId(s.to_owned());
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        BuildId::from_bytes(out).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = BuildId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<BuildId>().unwrap(), id);
    }

    #[test]
    fn rejects_bad_text() {
        for s in ["", "xyz", &"0".repeat(32), &"g".repeat(32), &"a".repeat(31)] {
            assert!(s.parse::<BuildId>().is_err(), "{s:?} accepted");
        }
    }
}
