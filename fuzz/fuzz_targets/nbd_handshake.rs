//! Fuzzes the server side of the NBD handshake with arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rootfork_nbd::fuzzing::handshake(data);
});
