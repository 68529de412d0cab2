//! Handshake state machine behaviour, option by option.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::*;
use understudy_nbd_proto::reply::encode_option;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{
    Event, Handshake, HandshakeError, MAX_OPTION_DISCARD, MAX_OPTION_LEN, MAX_OPTIONS, MetaContext,
    Negotiated, SelectedContext,
};

/// Feed everything at once; return output and event.
fn run(
    hs: &mut Handshake,
    cat: &Catalog,
    input: &[u8],
) -> (Vec<u8>, Result<Option<Event<usize>>, HandshakeError>, usize) {
    let mut out = Vec::new();
    match hs.feed(input, cat, &mut out) {
        Ok(p) => (out, Ok(p.event), p.consumed),
        Err(e) => (out, Err(e), 0),
    }
}

fn started(cat: &Catalog, flags: u32) -> Handshake {
    let mut hs = Handshake::new();
    let (out, ev, n) = run(&mut hs, cat, &client_flags(flags));
    assert!(out.is_empty());
    assert_eq!(ev, Ok(None));
    assert_eq!(n, 4);
    hs
}

#[test]
fn greeting_layout() {
    let g = Handshake::new().greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
}

#[test]
fn unknown_client_flags_close() {
    let cat = Catalog::two();
    let mut hs = Handshake::new();
    let (_, ev, _) = run(&mut hs, &cat, &client_flags(FLAG_C_FIXED_NEWSTYLE | 4));
    assert_eq!(ev, Err(HandshakeError::ClientFlags(5)));
}

#[test]
fn go_with_infos_enters_transmission_and_keeps_trailing_bytes() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let mut input = encode_option(
        OPT_GO,
        &info_go_data("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999]),
    );
    input.extend_from_slice(b"TRAILING");
    let (out, ev, n) = run(&mut hs, &cat, &input);
    assert_eq!(n, input.len() - 8, "bytes after GO belong to transmission");
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|(h, _)| h.typ).collect();
    assert_eq!(types, [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    // INFO_EXPORT: size and flags; no DF without structured replies.
    let export = &r[0].1;
    assert_eq!(u16::from_be_bytes([export[0], export[1]]), INFO_EXPORT);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        1 << 20
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags & FLAG_SEND_DF, 0);
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(
        &r[1].1[2..],
        b"a",
        "default export resolves to its canonical name"
    );
    assert_eq!(&r[2].1[2..], b"the a disk");
    assert_eq!(r[3].1.len(), 14);
    assert_eq!(
        u32::from_be_bytes(r[3].1[10..14].try_into().unwrap()),
        32 << 20
    );
    match ev.unwrap() {
        Some(Event::Transmission(Negotiated {
            export,
            name,
            size,
            structured,
            via_go,
            contexts,
            ..
        })) => {
            assert_eq!(
                (export, name.as_str(), size, structured, via_go),
                (0, "a", 1 << 20, false, true)
            );
            assert!(contexts.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(hs.is_done());
    assert_eq!(
        hs.feed(b"x", &cat, &mut Vec::new()),
        Err(HandshakeError::Finished)
    );
}

#[test]
fn info_does_not_end_and_unknown_export_is_an_error_reply() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_INFO, &info_go_data("b", &[]));
    input.extend(encode_option(OPT_GO, &info_go_data("nope", &[])));
    let (out, ev, n) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(None));
    assert_eq!(n, input.len());
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|(h, _)| h.typ).collect();
    assert_eq!(types, [REP_INFO, REP_INFO, REP_ACK, REP_ERR_UNKNOWN]);
    assert!(String::from_utf8_lossy(&r[3].1).contains("nope"));
    assert!(!hs.is_done());
}

#[test]
fn malformed_info_go_is_invalid() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut bad_count = info_go_data("a", &[INFO_NAME]);
    bad_count.push(0); // one stray byte
    let mut name_too_long = info_go_data("a", &[]);
    name_too_long[3] = 200;
    let cases = [
        (vec![0u8; 5], REP_ERR_INVALID),
        (bad_count, REP_ERR_INVALID),
        (name_too_long, REP_ERR_INVALID),
        (info_go_data("\u{ff}", &[]), REP_ERR_UNKNOWN),
    ];
    for (data, expect) in cases {
        let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_GO, &data));
        assert_eq!(ev, Ok(None));
        let r = replies(&out);
        assert_eq!(r.len(), 1, "{data:?}");
        assert_eq!(r[0].0.typ, expect, "{data:?}");
    }
    // Non-UTF-8 names are invalid, not unknown.
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data_raw(&[0xff, 0xfe])),
    );
    assert_eq!(replies(&out)[0].0.typ, REP_ERR_INVALID);
}

fn info_go_data_raw(name: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

#[test]
fn export_name_with_and_without_zeroes() {
    let cat = Catalog::two();
    for (flags, extra) in [
        (FLAG_C_FIXED_NEWSTYLE, 124usize),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut hs = started(&cat, flags);
        let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_EXPORT_NAME, b"b"));
        assert_eq!(out.len(), 10 + extra);
        assert_eq!(u64::from_be_bytes(out[0..8].try_into().unwrap()), 4096);
        assert!(out[10..].iter().all(|&b| b == 0));
        assert!(matches!(
            ev,
            Ok(Some(Event::Transmission(Negotiated {
                export: 1,
                via_go: false,
                ..
            })))
        ));
    }
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let (out, ev, _) = run(&mut hs, &cat, &encode_option(OPT_EXPORT_NAME, b"zzz"));
    assert!(out.is_empty());
    assert_eq!(
        ev,
        Err(HandshakeError::UnknownExport { name: "zzz".into() })
    );
}

#[test]
fn list_abort_unknown_starttls_extended() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_LIST, &[]);
    input.extend(encode_option(OPT_LIST, b"x"));
    input.extend(encode_option(0x1234, b"whatever"));
    input.extend(encode_option(OPT_STARTTLS, &[]));
    input.extend(encode_option(OPT_EXTENDED_HEADERS, &[]));
    input.extend(encode_option(OPT_PEEK_EXPORT, &[]));
    input.extend(encode_option(OPT_ABORT, b"ignored"));
    input.extend(encode_option(OPT_LIST, &[]));
    let (out, ev, n) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(Some(Event::Abort)));
    assert_eq!(n, input.len() - 16, "nothing after ABORT is consumed");
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|(h, _)| h.typ).collect();
    assert_eq!(
        types,
        [
            REP_SERVER,
            REP_SERVER,
            REP_ACK,
            REP_ERR_INVALID,
            REP_ERR_UNSUP,
            REP_ERR_POLICY,
            REP_ERR_UNSUP,
            REP_ERR_UNSUP,
            REP_ACK
        ]
    );
    assert_eq!(r[0].1[..4], 1u32.to_be_bytes());
    assert_eq!(&r[0].1[4..5], b"a");
    assert_eq!(&r[0].1[5..], b"the a disk");
    assert_eq!(r[4].0.option, 0x1234);
}

#[test]
fn structured_reply_twice_and_with_data() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_STRUCTURED_REPLY, b"x");
    input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(encode_option(OPT_GO, &info_go_data("a", &[])));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|(h, _)| h.typ).collect();
    assert_eq!(
        types,
        [
            REP_ERR_INVALID,
            REP_ACK,
            REP_ERR_INVALID,
            REP_INFO,
            REP_INFO,
            REP_ACK
        ]
    );
    let flags = u16::from_be_bytes([r[3].1[10], r[3].1[11]]);
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "DF is advertised once structured replies are on"
    );
    assert!(matches!(
        ev,
        Ok(Some(Event::Transmission(Negotiated {
            structured: true,
            ..
        })))
    ));
}

fn context_names(
    r: &[(understudy_nbd_proto::reply::OptionReplyHeader, Vec<u8>)],
) -> Vec<(u32, String)> {
    r.iter()
        .filter(|(h, _)| h.typ == REP_META_CONTEXT)
        .map(|(_, d)| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                String::from_utf8(d[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn meta_context_list_and_set() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    // SET before structured replies is refused.
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_SET_META_CONTEXT, &meta_data("a", &["base:allocation"])),
    );
    assert_eq!(replies(&out)[0].0.typ, REP_ERR_INVALID);
    // LIST is allowed before structured replies; empty query = everything.
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_LIST_META_CONTEXT, &meta_data("a", &[])),
    );
    let r = replies(&out);
    assert_eq!(r.last().unwrap().0.typ, REP_ACK);
    assert_eq!(
        context_names(&r),
        [
            (0, "base:allocation".into()),
            (0, "qemu:dirty-bitmap:b0".into()),
            (0, "qemu:dirty-bitmap:b1".into())
        ]
    );
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(
            OPT_LIST_META_CONTEXT,
            &meta_data("a", &["qemu:dirty-bitmap:", "x-other:thing"]),
        ),
    );
    assert_eq!(context_names(&replies(&out)).len(), 2);

    let (_, _, _) = run(&mut hs, &cat, &encode_option(OPT_STRUCTURED_REPLY, &[]));
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(
            OPT_SET_META_CONTEXT,
            &meta_data(
                "",
                &[
                    "qemu:dirty-bitmap:b1",
                    "base:",
                    "base:allocation",
                    "qemu:dirty-bitmap:missing",
                ],
            ),
        ),
    );
    let r = replies(&out);
    assert_eq!(r.last().unwrap().0.typ, REP_ACK);
    assert_eq!(
        context_names(&r),
        [
            (1, "qemu:dirty-bitmap:b1".into()),
            (2, "base:allocation".into())
        ]
    );
    let (_, ev, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_GO, &info_go_data("a", &[])),
    );
    match ev {
        Ok(Some(Event::Transmission(n))) => {
            assert_eq!(
                n.contexts,
                [
                    SelectedContext {
                        id: 1,
                        context: MetaContext::DirtyBitmap("b1".into())
                    },
                    SelectedContext {
                        id: 2,
                        context: MetaContext::BaseAllocation
                    }
                ]
            );
            assert!(n.transmission().has_meta_contexts);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn meta_contexts_are_dropped_when_go_names_another_export_or_set_fails() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_STRUCTURED_REPLY, &[]);
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
    ));
    input.extend(encode_option(OPT_GO, &info_go_data("b", &[])));
    let (_, ev, _) = run(&mut hs, &cat, &input);
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if n.contexts.is_empty()));

    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_STRUCTURED_REPLY, &[]);
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
    ));
    input.extend(encode_option(
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["nocolon"]),
    ));
    input.extend(encode_option(OPT_GO, &info_go_data("a", &[])));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    assert!(replies(&out).iter().any(|(h, _)| h.typ == REP_ERR_INVALID));
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if n.contexts.is_empty()));
}

#[test]
fn meta_context_malformed_and_limits() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let (_, ev, _) = run(&mut hs, &cat, &encode_option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(ev, Ok(None));
    let mut huge_count = meta_data("a", &[]);
    let l = huge_count.len();
    huge_count[l - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut lying_count = meta_data("a", &["base:allocation"]);
    lying_count[8..12].copy_from_slice(&3u32.to_be_bytes());
    let mut trailing = meta_data("a", &["base:allocation"]);
    trailing.push(b'!');
    let many: Vec<String> = (0..129).map(|i| format!("x:{i}")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (huge_count, REP_ERR_TOO_BIG),
        (lying_count, REP_ERR_INVALID),
        (trailing, REP_ERR_INVALID),
        (meta_data("a", &many_refs), REP_ERR_TOO_BIG),
        (meta_data("nope", &["base:allocation"]), REP_ERR_UNKNOWN),
        (vec![0, 0, 0], REP_ERR_INVALID),
    ];
    for (data, expect) in cases {
        for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let (out, ev, _) = run(&mut hs, &cat, &encode_option(opt, &data));
            assert_eq!(ev, Ok(None));
            let r = replies(&out);
            assert_eq!(r.len(), 1);
            assert_eq!(
                r[0].0.typ,
                expect,
                "option {opt} data {:?}",
                &data[..data.len().min(16)]
            );
        }
    }
}

#[test]
fn over_long_option_is_discarded_without_buffering() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let len = MAX_OPTION_LEN + 1;
    let mut header = understudy_nbd_proto::wire::IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&len.to_be_bytes());
    let (out, ev, _) = run(&mut hs, &cat, &header);
    assert!(out.is_empty());
    assert_eq!(ev, Ok(None));
    // Stream the body in small pieces; the reply comes after the last byte.
    let chunk = vec![0u8; 4096];
    let mut left = len as usize;
    let mut out = Vec::new();
    while left > 0 {
        let n = left.min(chunk.len());
        let p = hs.feed(&chunk[..n], &cat, &mut out).unwrap();
        assert_eq!(p.consumed, n);
        left -= n;
        if left > 0 {
            assert!(out.is_empty());
        }
    }
    let r = replies(&out);
    assert_eq!(
        (r.len(), r[0].0.typ, r[0].0.option),
        (1, REP_ERR_TOO_BIG, OPT_GO)
    );
    // The stream is still in sync.
    let (out, _, _) = run(&mut hs, &cat, &encode_option(OPT_LIST, &[]));
    assert_eq!(replies(&out).last().unwrap().0.typ, REP_ACK);

    // Beyond the discard limit, or for EXPORT_NAME, the connection closes.
    for (opt, len) in [
        (OPT_GO, MAX_OPTION_DISCARD + 1),
        (OPT_EXPORT_NAME, MAX_OPTION_LEN + 1),
    ] {
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&opt.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        let (_, ev, _) = run(&mut hs, &cat, &h);
        assert_eq!(ev, Err(HandshakeError::OptionTooLong { option: opt, len }));
    }
}

#[test]
fn bad_magic_and_too_many_options_close() {
    let cat = Catalog::two();
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut bad = encode_option(OPT_LIST, &[]);
    bad[0] ^= 1;
    let (_, ev, _) = run(&mut hs, &cat, &bad);
    assert!(matches!(ev, Err(HandshakeError::OptionMagic(_))));

    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let one = encode_option(0x99, &[]);
    let mut input = Vec::new();
    for _ in 0..MAX_OPTIONS {
        input.extend_from_slice(&one);
    }
    let (out, ev, _) = run(&mut hs, &cat, &input);
    assert_eq!(ev, Ok(None));
    assert_eq!(replies(&out).len(), MAX_OPTIONS as usize);
    let (_, ev, _) = run(&mut hs, &cat, &one);
    assert_eq!(ev, Err(HandshakeError::TooManyOptions));
}

/// `understudy:order` is offered only where the export lists it, selected
/// only by an exact `SET`, and only then allows `CMD_ORDER`.
#[test]
fn order_context_negotiation() {
    let mut journaled = desc("j", 1 << 20, &[]);
    journaled.contexts.push(MetaContext::Order);
    let cat = Catalog {
        exports: vec![desc("a", 1 << 20, &[]), journaled],
    };
    let order_of = |hs: &mut Handshake, export: &str, queries: &[&str]| {
        let mut input = encode_option(OPT_SET_META_CONTEXT, &meta_data(export, queries));
        input.extend(encode_option(OPT_GO, &info_go_data(export, &[])));
        let (out, ev, _) = run(hs, &cat, &input);
        match ev {
            Ok(Some(Event::Transmission(n))) => (context_names(&replies(&out)), n.transmission()),
            other => panic!("unexpected {other:?}"),
        }
    };
    let structured = |cat: &Catalog| {
        let mut hs = started(cat, FLAG_C_FIXED_NEWSTYLE);
        let (_, ev, _) = run(&mut hs, cat, &encode_option(OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(ev, Ok(None));
        hs
    };

    // Listed by the namespace wildcard and by an empty query, on "j" only.
    let mut hs = structured(&cat);
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_LIST_META_CONTEXT, &meta_data("j", &["understudy:"])),
    );
    assert_eq!(
        context_names(&replies(&out)),
        [(0, "understudy:order".into())]
    );
    let (out, _, _) = run(
        &mut hs,
        &cat,
        &encode_option(OPT_LIST_META_CONTEXT, &meta_data("a", &["understudy:"])),
    );
    assert!(context_names(&replies(&out)).is_empty());

    // Selected on the journaled export: ORDER allowed.
    let (names, t) = order_of(&mut hs, "j", &["understudy:order", "base:allocation"]);
    assert_eq!(
        names,
        [
            (1, "understudy:order".into()),
            (2, "base:allocation".into())
        ]
    );
    assert!(t.order && t.has_meta_contexts);

    // Asked for on an export without a journal: not granted.
    let mut hs = structured(&cat);
    let (names, t) = order_of(&mut hs, "a", &["understudy:order"]);
    assert!(names.is_empty());
    assert!(!t.order);

    // Standard clients that never ask (base:allocation only) never get it.
    let mut hs = structured(&cat);
    let (_, t) = order_of(&mut hs, "j", &["base:allocation"]);
    assert!(!t.order && t.has_meta_contexts);

    // Without structured replies SET fails, so ORDER stays unavailable.
    let mut hs = started(&cat, FLAG_C_FIXED_NEWSTYLE);
    let mut input = encode_option(OPT_SET_META_CONTEXT, &meta_data("j", &["understudy:order"]));
    input.extend(encode_option(OPT_GO, &info_go_data("j", &[])));
    let (out, ev, _) = run(&mut hs, &cat, &input);
    assert!(replies(&out).iter().any(|(h, _)| h.typ == REP_ERR_INVALID));
    assert!(matches!(ev, Ok(Some(Event::Transmission(ref n))) if !n.transmission().order));
}
