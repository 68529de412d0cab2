//! Arbitrary client bytes through the NBD server handshake state machine,
//! fed in pieces whose sizes the input also chooses. Checks that nothing
//! panics, that consumption never exceeds the input, and that the output
//! is a well-formed stream of option replies. The input also picks the
//! TLS policy; every `StartTls` is treated as a successful upgrade, and
//! under `Required` no export is entered before it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_nbd_proto::reply::parse_option_reply;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{
    BlockSize, Event, ExportCatalog, ExportDescriptor, Handshake, Listing, MetaContext,
    TlsPolicy,
};

struct Catalog;

impl ExportCatalog for Catalog {
    type Handle = ();
    fn lookup(&self, name: &str) -> Option<(ExportDescriptor, ())> {
        let name = match name {
            "" | "a" => "a",
            "b" => "b",
            _ => return None,
        };
        Some((
            ExportDescriptor {
                name: name.into(),
                description: "fuzz".into(),
                size: 1 << 30,
                flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                block_size: BlockSize {
                    min: 1,
                    preferred: 4096,
                    max: 32 << 20,
                },
                contexts: vec![
                    MetaContext::BaseAllocation,
                    MetaContext::DirtyBitmap("b0".into()),
                ],
                // "b" is served only over TLS.
                tls_only: name == "b",
            },
            (),
        ))
    }
    fn list(&self, f: &mut dyn FnMut(Listing<'_>)) {
        f(Listing {
            name: "a",
            description: "fuzz",
            tls_only: false,
        });
        f(Listing {
            name: "b",
            description: "",
            tls_only: true,
        });
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: piece size for feeding (1..=256); second: TLS policy.
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let Some((&policy, mut input)) = input.split_first() else {
        return;
    };
    let policy = match policy % 3 {
        0 => TlsPolicy::Off,
        1 => TlsPolicy::Allowed,
        _ => TlsPolicy::Required,
    };
    let step = usize::from(step) + 1;
    let mut hs = Handshake::with_tls(policy);
    let mut out = Vec::new();
    let mut ended = false;
    while !input.is_empty() && !ended {
        let piece = &input[..step.min(input.len())];
        match hs.feed(piece, &Catalog, &mut out) {
            Ok(p) => {
                assert!(p.consumed <= piece.len());
                match p.event {
                    Some(Event::StartTls) => {
                        assert_ne!(policy, TlsPolicy::Off);
                        assert!(!hs.tls_active(), "upgraded twice");
                        hs.tls_established();
                    }
                    Some(ev) => {
                        ended = true;
                        if let Event::Transmission(n) = ev {
                            assert_ne!(n.flags & FLAG_HAS_FLAGS, 0);
                            assert!(n.structured || n.contexts.is_empty());
                            assert!(policy != TlsPolicy::Required || hs.tls_active());
                            assert!(n.name != "b" || hs.tls_active(), "TLS-only export in plaintext");
                        }
                    }
                    None => assert_eq!(p.consumed, piece.len()),
                }
                input = &input[p.consumed..];
            }
            Err(_) => break,
        }
    }
    // Option replies parse back; an EXPORT_NAME reply (10 or 134 bytes)
    // may only end the stream.
    let mut rest = &out[..];
    while rest.len() >= 20 {
        let Some(h) = parse_option_reply(rest[..20].try_into().expect("20 bytes")) else {
            assert!(rest.len() == 10 || rest.len() == 134);
            return;
        };
        let end = 20 + h.length as usize;
        assert!(end <= rest.len());
        rest = &rest[end..];
    }
    assert!(rest.is_empty() || rest.len() == 10);
});
