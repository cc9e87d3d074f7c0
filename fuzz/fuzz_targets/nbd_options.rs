//! Fuzzes the parsers of option payloads (INFO/GO, LIST/SET_META_CONTEXT).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rootfork_nbd::fuzzing::option_payloads(data);
});
