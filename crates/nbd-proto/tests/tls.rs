//! The STARTTLS states of the handshake: upgrade, refusals before TLS,
//! and what is forgotten at the upgrade.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::*;
use understudy_nbd_proto::reply::encode_option;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{Event, Handshake, HandshakeError, MAX_OPTION_LEN, TlsPolicy};

type Fed = (Vec<u8>, Result<Option<Event<usize>>, HandshakeError>, usize);

fn run(hs: &mut Handshake, cat: &Catalog, input: &[u8]) -> Fed {
    let mut out = Vec::new();
    match hs.feed(input, cat, &mut out) {
        Ok(p) => (out, Ok(p.event), p.consumed),
        Err(e) => (out, Err(e), 0),
    }
}

fn started(cat: &Catalog, tls: TlsPolicy) -> Handshake {
    let mut hs = Handshake::with_tls(tls);
    let (out, ev, n) = run(&mut hs, cat, &client_flags(FLAG_C_FIXED_NEWSTYLE));
    assert!(out.is_empty());
    assert_eq!(ev, Ok(None));
    assert_eq!(n, 4);
    hs
}

fn types(out: &[u8]) -> Vec<u32> {
    replies(out).iter().map(|(h, _)| h.typ).collect()
}

/// STARTTLS, acknowledged; `trailing` (the start of a ClientHello) stays
/// unconsumed.
fn upgrade(hs: &mut Handshake, cat: &Catalog) {
    let mut input = encode_option(OPT_STARTTLS, &[]);
    input.extend_from_slice(&[0x16, 0x03, 0x01]);
    let (out, ev, n) = run(hs, cat, &input);
    assert_eq!(ev, Ok(Some(Event::StartTls)));
    assert_eq!(n, 16, "the ClientHello bytes belong to the TLS layer");
    assert_eq!(types(&out), [REP_ACK]);
    assert!(!hs.tls_active());
    let (out, ev, _) = run(hs, cat, &input[16..]);
    assert_eq!(ev, Err(HandshakeError::TlsPending));
    assert!(out.is_empty());
    hs.tls_established();
    assert!(hs.tls_active());
}

#[test]
fn allowed_serves_plaintext_and_upgrades_on_request() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_SERVER, REP_SERVER, REP_ACK]);
    upgrade(&mut hs, &cat);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_SERVER, REP_SERVER, REP_ACK]);
}

#[test]
fn allowed_plaintext_go_enters_transmission() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    let (_, ev, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data("b", &[])),
    );
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if n.name == "b"));
    assert!(!hs.tls_active());
}

#[test]
fn second_starttls_is_invalid() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    upgrade(&mut hs, &cat);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_STARTTLS, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_ERR_INVALID]);
}

#[test]
fn starttls_with_data_is_invalid_and_does_not_upgrade() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_STARTTLS, b"x"));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_ERR_INVALID]);
    assert!(!hs.tls_active());
}

#[test]
fn required_refuses_every_option_before_tls() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    let mut input = encode_option(OPT_LIST, &[]);
    input.extend(encode_option(OPT_INFO, &info_go_data("a", &[INFO_NAME])));
    input.extend(encode_option(OPT_GO, &info_go_data("a", &[])));
    input.extend(encode_option(OPT_GO, &info_go_data("", &[])));
    input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(encode_option(
        OPT_LIST_META_CONTEXT,
        &meta_data("a", &["base:"]),
    ));
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
    ));
    input.extend(encode_option(0x1234, b"whatever"));
    input.extend(encode_option(OPT_EXTENDED_HEADERS, &[]));
    let (out, ev, n) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(None));
    assert_eq!(n, input.len());
    assert_eq!(types(&out), [REP_ERR_TLS_REQD; 9]);
    // The refusals name no export.
    assert!(!out.windows(8).any(|w| w == b"the a di"));
}

#[test]
fn required_export_name_before_tls_closes_without_reply() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_EXPORT_NAME, b"a"));
    assert_eq!(ev, Err(HandshakeError::TlsRequired));
    assert!(out.is_empty(), "not a byte of the export leaks");
    // Even an over-long name is refused at the header, before it is read.
    let mut hs = started(&cat, TlsPolicy::Required);
    let mut hdr = encode_option(OPT_EXPORT_NAME, &[]);
    hdr[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    let (out, ev, _) = run(&mut hs, &cat, &hdr);
    assert_eq!(ev, Err(HandshakeError::TlsRequired));
    assert!(out.is_empty());
}

#[test]
fn required_allows_abort_before_tls() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_ABORT, &[]));
    assert_eq!(ev, Ok(Some(Event::Abort)));
    assert_eq!(types(&out), [REP_ACK]);
}

#[test]
fn required_refuses_long_options_with_tls_reqd() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    let data = vec![0u8; MAX_OPTION_LEN as usize + 1];
    let (out, ev, n) = run(&mut hs, &cat, &encode_option(OPT_INFO, &data));
    assert_eq!(ev, Ok(None));
    assert_eq!(n, data.len() + 16);
    assert_eq!(types(&out), [REP_ERR_TLS_REQD]);
}

#[test]
fn required_serves_everything_after_tls() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    upgrade(&mut hs, &cat);
    let mut input = encode_option(OPT_LIST, &[]);
    input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(encode_option(OPT_GO, &info_go_data("a", &[])));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    let Ok(Some(Event::Transmission(n))) = ev else {
        panic!("GO over TLS did not enter transmission: {ev:?}");
    };
    assert_eq!(n.name, "a");
    assert!(n.structured);
    assert!(!types(&out).contains(&REP_ERR_TLS_REQD));
}

#[test]
fn upgrade_forgets_plaintext_negotiation() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    let mut input = encode_option(OPT_STRUCTURED_REPLY, &[]);
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
    ));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_ACK, REP_META_CONTEXT, REP_ACK]);
    upgrade(&mut hs, &cat);
    let (_, ev, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data("a", &[])),
    );
    let Ok(Some(Event::Transmission(n))) = ev else {
        panic!("GO did not enter transmission: {ev:?}");
    };
    assert!(!n.structured, "structured replies negotiated in plaintext");
    assert!(n.contexts.is_empty(), "contexts selected in plaintext");
}

#[test]
fn off_refuses_starttls_with_policy() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Off);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_STARTTLS, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_ERR_POLICY]);
    // Never TLS_REQD without TLS.
    let (out, _, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(types(&out), [REP_SERVER, REP_SERVER, REP_ACK]);
}

#[test]
fn tls_established_without_pending_upgrade_does_nothing() {
    let cat = Catalog::two();
    let mut hs = started(&cat, TlsPolicy::Required);
    hs.tls_established();
    assert!(!hs.tls_active());
    let (out, _, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(types(&out), [REP_ERR_TLS_REQD]);
}

#[test]
fn starttls_needs_fixed_newstyle() {
    let cat = Catalog::two();
    let mut hs = Handshake::with_tls(TlsPolicy::Allowed);
    let (_, ev, _) = run(&mut hs, &cat, &client_flags(FLAG_C_NO_ZEROES));
    assert_eq!(ev, Ok(None));
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_STARTTLS, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_ERR_POLICY]);
    assert!(!hs.tls_active());
}

/// "a" is open, "b" is served only over TLS.
fn selective() -> Catalog {
    let mut cat = Catalog::two();
    cat.exports[1].tls_only = true;
    cat
}

#[test]
fn tls_only_export_is_hidden_and_refused_before_tls() {
    let cat = selective();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    let mut input = encode_option(OPT_LIST, &[]);
    input.extend(encode_option(OPT_INFO, &info_go_data("b", &[])));
    input.extend(encode_option(OPT_GO, &info_go_data("b", &[])));
    input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(encode_option(
        OPT_LIST_META_CONTEXT,
        &meta_data("b", &["base:"]),
    ));
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("b", &["base:allocation"]),
    ));
    input.extend(encode_option(OPT_INFO, &info_go_data("a", &[])));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(None));
    let r = replies(&out);
    let t: Vec<u32> = r.iter().map(|(h, _)| h.typ).collect();
    assert_eq!(
        t,
        [
            REP_SERVER, // only "a"
            REP_ACK,
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ACK,
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_INFO,
            REP_INFO,
            REP_ACK
        ]
    );
    assert_eq!(&r[0].1[4..5], b"a");
    // EXPORT_NAME of it closes without a byte.
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_EXPORT_NAME, b"b"));
    assert_eq!(ev, Err(HandshakeError::TlsRequired));
    assert!(out.is_empty());
}

#[test]
fn tls_only_export_is_served_after_tls() {
    let cat = selective();
    let mut hs = started(&cat, TlsPolicy::Allowed);
    upgrade(&mut hs, &cat);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(ev, Ok(None));
    assert_eq!(types(&out), [REP_SERVER, REP_SERVER, REP_ACK]);
    let (_, ev, _) = run(&mut hs, &cat, &encode_option(OPT_EXPORT_NAME, b"b"));
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if n.name == "b"));
}

#[test]
fn tls_only_export_on_a_server_without_tls_is_refused_by_policy() {
    let cat = selective();
    let mut hs = started(&cat, TlsPolicy::Off);
    let (out, ev, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data("b", &[])),
    );
    assert_eq!(ev, Ok(None));
    assert_eq!(
        types(&out),
        [REP_ERR_POLICY],
        "NOTLS never sends ERR_TLS_REQD"
    );
    let (_, ev, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data("a", &[])),
    );
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if n.name == "a"));
}
