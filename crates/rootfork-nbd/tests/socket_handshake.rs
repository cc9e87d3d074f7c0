//! Raw-socket conformance tests of the handshake: every option, reply and error path.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common::*;
use rootfork_nbd::consts::*;
use rootfork_nbd::meta::{BASE_ALLOCATION, ROOTFORK_OVERLAY};
use rootfork_nbd::options::{encode_info, encode_meta};

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[0..8].try_into().unwrap())
}

#[test]
fn socket_is_created_0600_and_removed_at_shutdown() {
    let f = fixture();
    let mode = std::fs::metadata(&f.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    f.server.shutdown(std::time::Duration::from_secs(1));
    assert!(!f.path.exists());
}

#[test]
fn stale_socket_is_replaced_but_live_one_refused() {
    let f = fixture();
    let other = rootfork_nbd::Server::new(Default::default());
    assert!(matches!(
        other.listen_unix(&f.path),
        Err(rootfork_nbd::ServerError::AddressInUse(_))
    ));
    let stale = f.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    other.listen_unix(&stale).unwrap();
    let plain = f.dir.path().join("file");
    std::fs::write(&plain, b"x").unwrap();
    assert!(matches!(
        other.listen_unix(&plain),
        Err(rootfork_nbd::ServerError::AddressInUse(_))
    ));
    other.shutdown(std::time::Duration::ZERO);
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(OPT_EXPORT_NAME, b"disk");
    let b = c.read_n(10);
    assert_eq!(be64(&b), SIZE);
    let flags = be16(&b[8..]);
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "no structured replies negotiated");
    c.req(CMD_READ, 0, 1, 0, 512);
    assert_eq!(c.simple(), (0, 1), "no zero padding was sent");
    c.read_n(512);

    let mut c = Raw::greet(&f.path);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.opt(OPT_EXPORT_NAME, b"disk");
    let b = c.read_n(134);
    assert!(b[10..].iter().all(|&x| x == 0));
    c.req(CMD_FLUSH, 0, 2, 0, 0);
    assert_eq!(c.simple(), (0, 2));
}

#[test]
fn export_name_unknown_closes() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.at_eof());
}

#[test]
fn unknown_client_flags_end_the_handshake() {
    let f = fixture();
    let mut c = Raw::greet(&f.path);
    c.send(&(FLAG_C_FIXED_NEWSTYLE | 1 << 7).to_be_bytes());
    assert!(c.at_eof());
}

#[test]
fn bad_option_magic_closes() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.send(&[0u8; 16]);
    assert!(c.at_eof());
}

#[test]
fn non_fixed_client_may_only_use_export_name() {
    let f = fixture();
    let mut c = Raw::greet(&f.path);
    c.send(&0u32.to_be_bytes());
    c.opt(OPT_LIST, &[]);
    assert!(c.at_eof());
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    assert_eq!(c.simple_opt(OPT_ABORT), REP_ACK);
    assert!(c.at_eof());
}

#[test]
fn list_exports() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(OPT_LIST, &[]);
    let r = c.opt_replies();
    let names: Vec<String> = r
        .iter()
        .filter(|(t, _)| *t == REP_SERVER)
        .map(|(_, d)| {
            let n = be32(d) as usize;
            String::from_utf8(d[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["disk", "ro"]);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    c.opt(OPT_LIST, b"junk");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Still usable afterwards.
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ACK);
}

#[test]
fn info_reports_export_name_description_block_size_and_keeps_going() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(
        OPT_INFO,
        &encode_info("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77]),
    );
    let r = c.opt_replies();
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let infos: Vec<&Vec<u8>> = r
        .iter()
        .filter(|(t, _)| *t == REP_INFO)
        .map(|(_, d)| d)
        .collect();
    let find = |ty: u16| {
        infos
            .iter()
            .find(|d| be16(d) == ty)
            .unwrap_or_else(|| panic!("info {ty}"))
    };
    let e = find(INFO_EXPORT);
    assert_eq!(e.len(), 12);
    assert_eq!(be64(&e[2..]), SIZE);
    assert_eq!(&find(INFO_NAME)[2..], b"disk");
    assert_eq!(&find(INFO_DESCRIPTION)[2..], b"a test disk");
    let bs = find(INFO_BLOCK_SIZE);
    assert_eq!(
        (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
        (1, 4096, 32 << 20)
    );
    // INFO leaves the handshake open; GO then enters transmission.
    c.opt(OPT_INFO, &encode_info("nope", &[]));
    assert_eq!(c.opt_reply().1, REP_ERR_UNKNOWN);
    c.go("disk", false, false, &[]);
    c.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.simple(), (0, 5));
}

#[test]
fn read_only_export_flags() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(OPT_INFO, &encode_info("ro", &[]));
    let r = c.opt_replies();
    let e = &r[0].1;
    let flags = be16(&e[10..]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
}

#[test]
fn malformed_and_oversized_options() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    // Name length larger than the payload.
    c.opt(OPT_GO, &[0, 0, 0, 50, b'd']);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // Info count inconsistent with the payload.
    let mut d = encode_info("disk", &[]);
    d.push(0);
    c.opt(OPT_INFO, &d);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // A name over 4096 bytes.
    c.opt(OPT_INFO, &encode_info(&"x".repeat(5000), &[]));
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    // An option payload over the limit is skipped, answered TOO_BIG, and sync is kept.
    c.opt(OPT_INFO, &vec![0u8; 100_000]);
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    // Invalid UTF-8 name.
    c.opt(OPT_INFO, &[0, 0, 0, 2, 0xff, 0xfe, 0, 0]);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ACK);
}

#[test]
fn starttls_refused_with_policy_and_unknown_options_unsupported() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    assert_eq!(c.simple_opt(OPT_STARTTLS), REP_ERR_POLICY);
    c.opt(4242, b"some payload");
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.opt(4, &[]); // NBD_OPT_PEEK_EXPORT, withdrawn
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.go("disk", true, false, &[]);
}

#[test]
fn structured_and_extended_negotiation_rules() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.opt(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ACK);
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ERR_INVALID);
    c.opt(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    assert_eq!(c.simple_opt(OPT_EXTENDED_HEADERS), REP_ACK);
    assert_eq!(c.simple_opt(OPT_EXTENDED_HEADERS), REP_ERR_INVALID);
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ERR_EXT_HEADER_REQD);
    c.opt(OPT_GO, &encode_info("disk", &[]));
    let r = c.opt_replies();
    let flags = be16(&r[0].1[10..]);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
}

#[test]
fn meta_context_list_and_set() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    // SET needs structured replies.
    c.opt(
        OPT_SET_META_CONTEXT,
        &encode_meta("disk", &[BASE_ALLOCATION]),
    );
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    assert_eq!(c.simple_opt(OPT_STRUCTURED_REPLY), REP_ACK);
    let names = |r: &[(u32, Vec<u8>)]| -> Vec<String> {
        r.iter()
            .filter(|(t, _)| *t == REP_META_CONTEXT)
            .map(|(_, d)| String::from_utf8(d[4..].to_vec()).unwrap())
            .collect()
    };
    c.opt(OPT_LIST_META_CONTEXT, &encode_meta("disk", &[]));
    assert_eq!(
        names(&c.opt_replies()),
        vec![BASE_ALLOCATION, ROOTFORK_OVERLAY]
    );
    c.opt(OPT_LIST_META_CONTEXT, &encode_meta("disk", &["base:"]));
    assert_eq!(names(&c.opt_replies()), vec![BASE_ALLOCATION]);
    c.opt(
        OPT_LIST_META_CONTEXT,
        &encode_meta("disk", &["qemu:dirty-bitmap:x", "rootfork:"]),
    );
    assert_eq!(names(&c.opt_replies()), vec![ROOTFORK_OVERLAY]);
    c.opt(OPT_LIST_META_CONTEXT, &encode_meta("nope", &[]));
    assert_eq!(c.opt_reply().1, REP_ERR_UNKNOWN);
    c.opt(
        OPT_SET_META_CONTEXT,
        &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 9],
    );
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(
        OPT_SET_META_CONTEXT,
        &encode_meta(
            "disk",
            &[
                BASE_ALLOCATION,
                "base:",
                "nope:x",
                ROOTFORK_OVERLAY,
                BASE_ALLOCATION,
            ],
        ),
    );
    let r = c.opt_replies();
    assert_eq!(names(&r), vec![BASE_ALLOCATION, ROOTFORK_OVERLAY]);
    let ids: Vec<u32> = r
        .iter()
        .filter(|(t, _)| *t == REP_META_CONTEXT)
        .map(|(_, d)| be32(d))
        .collect();
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn client_closing_mid_handshake_is_harmless() {
    let f = fixture();
    {
        let mut c = Raw::connect(&f.path);
        c.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    }
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, false, &[]);
    for _ in 0..100 {
        if f.server.connections() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(f.server.connections(), 1);
}
