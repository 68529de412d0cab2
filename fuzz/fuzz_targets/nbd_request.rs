//! Arbitrary request headers validated against arbitrary export facts:
//! nothing panics and every accepted range lies inside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{MAX_REQUEST_LEN, Op, Request, TransmissionInfo, validate_request};

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_HEADER_LEN + 11 {
        return;
    }
    let (hdr, rest) = data.split_at(REQUEST_HEADER_LEN);
    let hdr: &[u8; REQUEST_HEADER_LEN] = hdr.try_into().expect("28 bytes");
    // Also try the header with a correct magic, so validation is reached.
    let mut fixed = *hdr;
    fixed[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    let info = TransmissionInfo {
        size: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
        flags: u16::from_be_bytes([rest[8], rest[9]]),
        structured: rest[10] & 1 != 0,
        has_meta_contexts: rest[10] & 2 != 0,
        order: rest[10] & 4 != 0,
    };
    for h in [hdr, &fixed] {
        let Ok(req) = Request::parse(h) else { continue };
        assert_eq!(&req.encode(), h);
        let Ok(v) = validate_request(&req, &info) else {
            continue;
        };
        assert_eq!(v.cookie, req.cookie);
        let range = match v.op {
            Op::Read { offset, len, .. } | Op::Write { offset, len, .. } => {
                assert!(len <= MAX_REQUEST_LEN);
                Some((offset, len))
            }
            Op::Trim { offset, len, .. }
            | Op::Cache { offset, len }
            | Op::WriteZeroes { offset, len, .. }
            | Op::BlockStatus { offset, len, .. } => Some((offset, len)),
            Op::Order { fua } => {
                // The extension is reachable only when negotiated.
                assert!(info.order && req.command == CMD_ORDER);
                assert_eq!((req.offset, req.length), (0, 0));
                assert_eq!(fua, req.flags & CMD_FLAG_FUA != 0);
                None
            }
            Op::Flush | Op::Disc => None,
        };
        if let Some((o, l)) = range {
            assert!(o.checked_add(u64::from(l)).is_some_and(|e| e <= info.size));
        }
    }
});
