//! Entry points for fuzzers and property tests: feed arbitrary bytes to the handshake and to the
//! request parser/validator exactly as a client would, with nothing but memory behind them.
//!
//! The `fuzz/` crate (cargo-fuzz) calls these; `tests/parsers_proptest.rs` runs them on random
//! input in the ordinary test suite. Every function must return (never panic, never loop forever)
//! whatever the input.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::handshake::{negotiate, Export};
use crate::request::{classify, parse_header, payload_len, Limits};
use crate::testing::MemDevice;
use crate::ServeOptions;

/// A stream that reads from a fixed byte string and discards what is written.
struct Scripted<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the server side of the handshake against `input` as the client's bytes; returns whether a
/// session was agreed.
pub fn handshake(input: &[u8]) -> bool {
    let mut exports = BTreeMap::new();
    let dev = Arc::new(MemDevice::new(1 << 16, 4096));
    exports.insert(
        "disk".to_string(),
        Arc::new(Export {
            name: "disk".into(),
            description: "d".into(),
            device: dev,
        }),
    );
    let mut io = Scripted { input, written: 0 };
    matches!(
        negotiate(&mut io, &exports, &ServeOptions::default()),
        Ok(Some(_))
    )
}

/// Parses and validates a stream of requests from `input` the way the connection reader does
/// (header, classification, payload skip), under limits derived from the first input byte.
/// Returns how many requests were parsed before the input ended or lost sync.
pub fn requests(input: &[u8]) -> usize {
    let Some((&mode, mut rest)) = input.split_first() else {
        return 0;
    };
    let lim = Limits {
        size: 1 << 20,
        min_block: if mode & 1 != 0 { 512 } else { 1 },
        max_payload: 1 << 16,
        max_write: if mode & 32 != 0 { 1 << 17 } else { 1 << 16 },
        read_only: mode & 2 != 0,
        structured: mode & 4 != 0,
        extended: mode & 8 != 0,
        has_meta: mode & 16 != 0,
    };
    let mut n = 0;
    while let Ok(Some((h, used))) = parse_header(rest, lim.extended) {
        rest = &rest[used..];
        let skip = match classify(&h, &lim) {
            Ok(crate::request::Command::Write { len, .. }) => u64::from(len),
            Ok(_) => 0,
            Err(inv) => {
                assert_eq!(inv.payload, payload_len(&h, lim.extended));
                inv.payload
            }
        };
        n += 1;
        if skip > rest.len() as u64 {
            break;
        }
        rest = &rest[skip as usize..];
    }
    n
}

/// Parses `input` as the payloads of every option that has one.
pub fn option_payloads(input: &[u8]) {
    let _ = crate::options::parse_info(input);
    let _ = crate::options::parse_meta(input);
}
