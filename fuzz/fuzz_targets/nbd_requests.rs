//! Fuzzes the transmission-phase request parser and validator with arbitrary request streams
//! (the first byte picks the negotiated mode: alignment, read-only, structured, extended, meta).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rootfork_nbd::fuzzing::requests(data);
});
