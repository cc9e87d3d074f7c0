//! Property tests: random bytes into the handshake, the option parsers, the request parser and a
//! live kernel-mode connection never panic or hang; encodings round-trip.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rootfork_nbd::consts::*;
use rootfork_nbd::fuzzing;
use rootfork_nbd::kernel::KernelConnection;
use rootfork_nbd::options::{encode_info, encode_meta, parse_info, parse_meta};
use rootfork_nbd::request::{classify, encode_header, parse_header, Limits, RequestHeader};
use rootfork_nbd::testing::MemDevice;
use rootfork_nbd::ServeOptions;

/// Random bytes that start like a real client, so the fuzzing gets past the greeting.
fn client_prefix() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..400),
        proptest::collection::vec(
            (0u32..14, proptest::collection::vec(any::<u8>(), 0..40)),
            0..6,
        ),
    )
        .prop_map(|(fixed, junk, opts)| {
            let mut v = if fixed {
                3u32.to_be_bytes().to_vec()
            } else {
                Vec::new()
            };
            for (o, data) in opts {
                v.extend_from_slice(&IHAVEOPT.to_be_bytes());
                v.extend_from_slice(&o.to_be_bytes());
                v.extend_from_slice(&(data.len() as u32).to_be_bytes());
                v.extend(data);
            }
            v.extend(junk);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn handshake_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::handshake(&input);
    }

    #[test]
    fn handshake_with_plausible_options_never_panics(input in client_prefix()) {
        fuzzing::handshake(&input);
    }

    #[test]
    fn request_stream_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::requests(&input);
    }

    #[test]
    fn option_payloads_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzzing::option_payloads(&input);
    }

    #[test]
    fn info_and_meta_round_trip(name in "[a-z]{0,20}", infos in proptest::collection::vec(any::<u16>(), 0..8), qs in proptest::collection::vec("[a-z:]{0,12}", 0..5)) {
        let i = parse_info(&encode_info(&name, &infos)).unwrap();
        prop_assert_eq!(i.name, name.clone());
        prop_assert_eq!(i.infos, infos);
        let refs: Vec<&str> = qs.iter().map(|s| s.as_str()).collect();
        let m = parse_meta(&encode_meta(&name, &refs)).unwrap();
        prop_assert_eq!(m.export, name);
        prop_assert_eq!(m.queries, qs);
    }

    #[test]
    fn header_round_trip_and_classify_total(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32, ext: bool, ro: bool, st: bool) {
        let h = RequestHeader { flags, kind, cookie, offset, length: u64::from(length) };
        let b = encode_header(&h, ext);
        let (p, used) = parse_header(&b, ext).unwrap().unwrap();
        prop_assert_eq!(p, h);
        prop_assert_eq!(used, b.len());
        let lim = Limits { size: 1 << 30, min_block: 512, max_payload: 1 << 25, max_write: 1 << 26, read_only: ro, structured: st || ext, extended: ext, has_meta: st };
        match classify(&h, &lim) {
            Ok(_) => {}
            Err(inv) => prop_assert!([EPERM, EINVAL, ENOSPC, EOVERFLOW].contains(&inv.errno)),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A live kernel-mode connection fed arbitrary bytes (after some valid requests) answers what
    /// it can, ends cleanly when the stream ends, and never panics or hangs.
    #[test]
    fn live_connection_survives_random_streams(junk in proptest::collection::vec(any::<u8>(), 0..2000), valid in 0usize..4) {
        let dev = Arc::new(MemDevice::new(1 << 20, 4096));
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = KernelConnection::spawn(ours, dev, ServeOptions::default()).unwrap();
        let mut out = Vec::new();
        for i in 0..valid {
            out.extend(encode_header(&RequestHeader { flags: 0, kind: CMD_READ, cookie: i as u64, offset: 0, length: 512 }, false));
        }
        out.extend(&junk);
        let reader = std::thread::spawn(move || {
            theirs.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            theirs.write_all(&out).ok();
            theirs.shutdown(std::net::Shutdown::Write).ok();
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).ok();
            all
        });
        let _stats = conn.wait();
        let replies = reader.join().unwrap();
        prop_assert!(replies.len() >= valid * (16 + 512));
    }
}
