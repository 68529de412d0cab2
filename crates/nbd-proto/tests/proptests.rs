//! Property tests: codecs round-trip, and nothing panics on arbitrary input.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::*;
use proptest::prelude::*;
use understudy_nbd_proto::reply::*;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{
    Event, Handshake, MAX_REQUEST_LEN, NbdErrno, Op, Request, TlsPolicy, TransmissionInfo,
    validate_request,
};

fn arb_request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        prop_oneof![0u16..12, Just(CMD_ORDER), any::<u16>()],
        any::<u64>(),
        prop_oneof![any::<u64>(), 0u64..(1 << 21)],
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

fn arb_info() -> impl Strategy<Value = TransmissionInfo> {
    (
        prop_oneof![any::<u64>(), 0u64..(1 << 21)],
        any::<u16>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(size, flags, structured, has_meta_contexts, order)| TransmissionInfo {
                size,
                flags,
                structured,
                has_meta_contexts,
                order,
            },
        )
}

proptest! {
    #[test]
    fn request_round_trip(r in arb_request()) {
        let b = r.encode();
        prop_assert_eq!(Request::parse(&b).unwrap(), r);
    }

    #[test]
    fn request_parse_never_panics(b in proptest::array::uniform28(any::<u8>())) {
        if let Ok(r) = Request::parse(&b) {
            prop_assert_eq!(r.encode(), b);
        } else {
            prop_assert_ne!(&b[0..4], &REQUEST_MAGIC.to_be_bytes());
        }
    }

    /// Validation is total and every accepted range lies inside the export.
    #[test]
    fn validation_is_sound(r in arb_request(), e in arb_info()) {
        match validate_request(&r, &e) {
            Ok(v) => {
                prop_assert_eq!(v.cookie, r.cookie);
                let range = match v.op {
                    Op::Read { offset, len, .. } | Op::Write { offset, len, .. } => {
                        prop_assert!(len <= MAX_REQUEST_LEN);
                        Some((offset, len))
                    }
                    Op::Trim { offset, len, .. } | Op::Cache { offset, len } | Op::WriteZeroes { offset, len, .. } => Some((offset, len)),
                    Op::BlockStatus { offset, len, .. } => {
                        prop_assert!(len > 0 && e.structured && e.has_meta_contexts);
                        Some((offset, len))
                    }
                    Op::Flush => { prop_assert_eq!((r.offset, r.length), (0, 0)); None }
                    Op::Order { fua } => {
                        prop_assert!(e.order, "ORDER accepted without negotiation");
                        prop_assert_eq!(r.command, CMD_ORDER);
                        prop_assert_eq!((r.offset, r.length), (0, 0));
                        prop_assert_eq!(fua, r.flags & CMD_FLAG_FUA != 0);
                        prop_assert_eq!(r.flags & !CMD_FLAG_FUA, 0);
                        None
                    }
                    Op::Disc => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o.checked_add(u64::from(l)).is_some_and(|end| end <= e.size));
                }
                if e.flags & FLAG_READ_ONLY != 0 {
                    let writes = matches!(v.op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. });
                    prop_assert!(!writes);
                }
            }
            Err(errno) => prop_assert!(matches!(errno, NbdErrno::Inval | NbdErrno::Perm | NbdErrno::NoSpc | NbdErrno::Overflow)),
        }
    }

    /// The ORDER extension is invisible unless negotiated, and negotiating
    /// it changes nothing for any other command.
    #[test]
    fn order_extension_is_isolated(r in arb_request(), e in arb_info()) {
        let off = TransmissionInfo { order: false, ..e };
        let on = TransmissionInfo { order: true, ..e };
        if r.command == CMD_ORDER {
            prop_assert_eq!(validate_request(&r, &off), Err(NbdErrno::Inval));
            let expect_ok = r.offset == 0
                && r.length == 0
                && r.flags & !CMD_FLAG_FUA == 0
                && (r.flags & CMD_FLAG_FUA == 0 || e.flags & FLAG_SEND_FUA != 0);
            prop_assert_eq!(validate_request(&r, &on).is_ok(), expect_ok);
            prop_assert_eq!(r.payload_len(), 0);
        } else {
            prop_assert_eq!(validate_request(&r, &off), validate_request(&r, &on));
        }
    }

    #[test]
    fn simple_reply_round_trip(cookie in any::<u64>(), err in any::<u32>()) {
        prop_assert_eq!(parse_simple_reply(&simple_reply(cookie, err)), Some((err, cookie)));
    }

    #[test]
    fn chunk_header_round_trip(flags in any::<u16>(), typ in any::<u16>(), cookie in any::<u64>(), len in any::<u32>()) {
        let h = parse_chunk_header(&chunk_header(flags, typ, cookie, len)).unwrap();
        prop_assert_eq!(h, ChunkHeader { flags, typ, cookie, length: len });
    }

    #[test]
    fn error_chunk_round_trip(cookie in any::<u64>(), msg in ".{0,300}") {
        let mut out = Vec::new();
        error_chunk(&mut out, cookie, NbdErrno::NoSpc, &msg, true);
        let h = parse_chunk_header(out[..20].try_into().unwrap()).unwrap();
        prop_assert_eq!(h.length as usize, out.len() - 20);
        prop_assert_eq!(parse_error_payload(&out[20..]), Some((28, msg.as_str())));
    }

    /// Extents are clamped to the request, merged, and sum to at most it.
    #[test]
    fn block_status_builder(req_len in 1u32.., req_one in any::<bool>(), ext in proptest::collection::vec((0u64..(1 << 33), 0u32..4), 1..50)) {
        let mut out = Vec::new();
        let mut b = BlockStatusBuilder::new(&mut out, 1, 9, true, req_len, req_one);
        for (l, f) in &ext {
            if !b.push(*l, *f) { break; }
        }
        match b.finish() {
            Ok(n) => {
                let (id, got) = parse_block_status(&out[20..]).unwrap();
                prop_assert_eq!(id, 9);
                prop_assert_eq!(got.len() as u32, n);
                if req_one { prop_assert_eq!(n, 1); }
                let sum: u64 = got.iter().map(|(l, _)| u64::from(*l)).sum();
                prop_assert!(sum <= u64::from(req_len));
                prop_assert!(got.iter().all(|(l, _)| *l > 0));
                prop_assert!(got.windows(2).all(|w| w[0].1 != w[1].1));
            }
            Err(_) => {
                prop_assert!(out.is_empty());
                prop_assert!(ext.iter().all(|(l, _)| *l == 0));
            }
        }
    }

    #[test]
    fn option_round_trip(opt in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let b = encode_option(opt, &data);
        prop_assert_eq!(&b[..8], &IHAVEOPT.to_be_bytes());
        prop_assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), opt);
        prop_assert_eq!(u32::from_be_bytes(b[12..16].try_into().unwrap()) as usize, data.len());
        prop_assert_eq!(&b[16..], &data[..]);
    }

    /// Arbitrary bytes never panic the handshake, output is always well
    /// formed option replies, and splitting the input anywhere gives the
    /// same result as feeding it whole.
    #[test]
    fn handshake_arbitrary_and_split_invariant(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        opts in proptest::collection::vec((prop_oneof![1u32..12, any::<u32>()], proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
        split in any::<prop::sample::Index>(),
    ) {
        let cat = Catalog::two();
        let mut input = client_flags(FLAG_C_FIXED_NEWSTYLE).to_vec();
        for (o, d) in &opts {
            input.extend(encode_option(*o, d));
        }
        input.extend_from_slice(&body);

        let whole = feed_all(&cat, &[&input]);
        let at = split.index(input.len() + 1);
        let parts = feed_all(&cat, &[&input[..at], &input[at..]]);
        prop_assert_eq!(&whole, &parts);
        let bytes_one = feed_bytewise(&cat, &input);
        prop_assert_eq!(&whole, &bytes_one);
    }

    /// With every TLS policy, and export "b" TLS-only or not: no panic,
    /// split invariance, and the TLS rules hold: under `Required` nothing
    /// but refusals (and the STARTTLS or ABORT acknowledgement) leaves the
    /// server before the upgrade and no export is entered without it; a
    /// TLS-only export is never entered in plaintext; `ERR_TLS_REQD` never
    /// appears after the upgrade, under `Off`, or without a reason; `Off`
    /// never upgrades.
    #[test]
    fn handshake_tls_states(
        policy in prop_oneof![Just(TlsPolicy::Off), Just(TlsPolicy::Allowed), Just(TlsPolicy::Required)],
        opts in proptest::collection::vec((prop_oneof![1u32..12, Just(OPT_STARTTLS), any::<u32>()], prop_oneof![
            Just(Vec::new()),
            Just(info_go_data("a", &[INFO_NAME])),
            Just(info_go_data("", &[])),
            Just(info_go_data("b", &[])),
            Just(b"b".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]), 0..10),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        split in any::<prop::sample::Index>(),
        b_tls_only in any::<bool>(),
    ) {
        let mut cat = Catalog::two();
        cat.exports[1].tls_only = b_tls_only;
        let mut input = client_flags(FLAG_C_FIXED_NEWSTYLE).to_vec();
        for (o, d) in &opts {
            input.extend(encode_option(*o, d));
        }
        input.extend_from_slice(&body);
        let whole = feed_tls(&cat, policy, &[&input]);
        let at = split.index(input.len() + 1);
        let parts = feed_tls(&cat, policy, &[&input[..at], &input[at..]]);
        prop_assert_eq!(&whole, &parts);

        let (out, _, outcome, tls_at) = whole;
        let before = &out[..tls_at.unwrap_or(out.len())];
        let after = &out[tls_at.unwrap_or(out.len())..];
        if policy == TlsPolicy::Off {
            prop_assert!(tls_at.is_none());
        }
        if b_tls_only && tls_at.is_none() {
            prop_assert!(!outcome.contains("name: \"b\""), "TLS-only export in plaintext: {}", outcome);
        }
        if policy == TlsPolicy::Required {
            if tls_at.is_none() {
                prop_assert!(!outcome.starts_with("Transmission"), "{}", outcome);
            }
            for (h, _) in replies_lenient(before) {
                let ok = h.typ & REP_FLAG_ERROR != 0
                    || (h.typ == REP_ACK && (h.option == OPT_STARTTLS || h.option == OPT_ABORT));
                prop_assert!(ok, "reply {:#x} to option {} before TLS", h.typ, h.option);
            }
        } else if policy == TlsPolicy::Off || !b_tls_only {
            // Only a TLS-only export on a server offering TLS earns it.
            prop_assert!(replies_lenient(before).iter().all(|(h, _)| h.typ != REP_ERR_TLS_REQD));
        }
        prop_assert!(replies_lenient(after).iter().all(|(h, _)| h.typ != REP_ERR_TLS_REQD));
    }
}

/// Feed pieces with `policy`, upgrading at every `StartTls` (as if the TLS
/// handshake succeeded), until another event or an error. Returns (output,
/// consumed, outcome, output length at the upgrade).
fn feed_tls(
    cat: &Catalog,
    policy: TlsPolicy,
    pieces: &[&[u8]],
) -> (Vec<u8>, usize, String, Option<usize>) {
    let mut hs = Handshake::with_tls(policy);
    let mut out = Vec::new();
    let mut total = 0;
    let mut tls_at = None;
    for p in pieces {
        let mut p: &[u8] = p;
        while !p.is_empty() {
            match hs.feed(p, cat, &mut out) {
                Ok(pr) => {
                    total += pr.consumed;
                    p = &p[pr.consumed..];
                    match pr.event {
                        Some(Event::StartTls) => {
                            assert!(tls_at.is_none(), "upgraded twice");
                            tls_at = Some(out.len());
                            hs.tls_established();
                        }
                        Some(ev) => {
                            check_replies(&out);
                            return (out, total, format!("{ev:?}"), tls_at);
                        }
                        None => {}
                    }
                }
                Err(e) => return (out, 0, format!("{e}"), tls_at),
            }
        }
    }
    check_replies(&out);
    (out, total, "pending".into(), tls_at)
}

/// Option replies of a stream, stopping at anything else (an
/// `EXPORT_NAME` reply).
fn replies_lenient(mut out: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
    let mut v = Vec::new();
    while out.len() >= 20 {
        let Some(h) = parse_option_reply(out[..20].try_into().unwrap()) else {
            break;
        };
        let end = 20 + h.length as usize;
        v.push((h, out[20..end].to_vec()));
        out = &out[end..];
    }
    v
}

/// Feed pieces in order until an event or error; return (output, consumed,
/// outcome description).
fn feed_all(cat: &Catalog, pieces: &[&[u8]]) -> (Vec<u8>, usize, String) {
    let mut hs = Handshake::new();
    let mut out = Vec::new();
    let mut total = 0;
    for p in pieces {
        let mut p: &[u8] = p;
        while !p.is_empty() {
            match hs.feed(p, cat, &mut out) {
                Ok(pr) => {
                    total += pr.consumed;
                    if let Some(ev) = pr.event {
                        check_replies(&out);
                        return (out, total, format!("{ev:?}"));
                    }
                    p = &p[pr.consumed..];
                }
                // Consumption is unspecified once the stream is rejected.
                Err(e) => return (out, 0, format!("{e}")),
            }
        }
    }
    check_replies(&out);
    (out, total, "pending".into())
}

fn feed_bytewise(cat: &Catalog, input: &[u8]) -> (Vec<u8>, usize, String) {
    let pieces: Vec<&[u8]> = input.chunks(1).collect();
    feed_all(cat, &pieces)
}

/// Output must parse as option replies (EXPORT_NAME's bare reply excepted,
/// which only ever ends the stream).
fn check_replies(mut out: &[u8]) {
    while out.len() >= 20 {
        let Some(h) = parse_option_reply(out[..20].try_into().unwrap()) else {
            assert!(out.len() == 10 || out.len() == 134, "bad reply stream");
            return;
        };
        let end = 20 + h.length as usize;
        assert!(end <= out.len());
        out = &out[end..];
    }
    assert!(
        out.is_empty() || out.len() == 10,
        "trailing {} bytes",
        out.len()
    );
}
