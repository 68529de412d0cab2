//! Recovery of an arbitrary journal. The input is turned into a journal
//! file: a valid header, then records whose CRCs are fixed up (so the fuzzer
//! reaches the record walk, epoch completion and replay) with optional bit
//! flips; the raw input is also tried as a whole file. Opening must return
//! Ok or Err, never panic, hang or allocate beyond the ring size.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use understudy_journal::format::{
    HEADER_SLOT, Header, REC_HDR, RING_START, RecordHeader, RecordKind, align_up, phys,
};
use understudy_journal::sim::SimWorld;
use understudy_journal::{EpochDisk, JournalConfig, scan};

const IMAGE: usize = 64 * 1024;
const CAP: u64 = 64 * 1024;

fn open(journal: Vec<u8>) {
    let w = SimWorld::new();
    let img = w.add_file(vec![0u8; IMAGE]);
    let jr = w.add_file(journal);
    let _ = scan::scan(&w.file(jr));
    let cfg = JournalConfig {
        capacity: CAP,
        ..Default::default()
    };
    if let Ok((d, _)) = EpochDisk::open(Arc::new(w.disk(img)), Arc::new(w.file(jr)), cfg) {
        let _ = d.close();
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = RecordHeader::decode(data);
    let _ = Header::decode(data);
    if data.len() < 4 {
        return;
    }
    // Raw bytes as a whole file.
    open(data.to_vec());

    // Structured: header, then records built from 16-byte chunks.
    let mut file = vec![0u8; (RING_START + CAP) as usize];
    let h = Header {
        log_id: 7,
        generation: u64::from(data[0]),
        capacity: CAP,
        image_size: IMAGE as u64,
        tail: u64::from(data[1]) * 512,
        tail_seq: 1,
        base_epoch: u64::from(data[2] % 4),
    };
    h.encode(&mut file[(h.generation % 2 * HEADER_SLOT) as usize..]);
    let mut pos = h.tail;
    let mut seq = 1u64;
    for c in data[3..].chunks(16) {
        if c.len() < 16 {
            break;
        }
        let kind = RecordKind::from_u8(c[0] % 7).unwrap_or(RecordKind::Write);
        let payload = if kind == RecordKind::Write {
            usize::from(c[1]) * 8
        } else {
            0
        };
        let total = align_up((REC_HDR + payload) as u64);
        if pos - h.tail + total > CAP || total > CAP - pos % CAP {
            break;
        }
        let mut rec = vec![c[2]; total as usize];
        let r = RecordHeader {
            kind,
            flags: c[3] & 1,
            log_id: if c[4] == 0xFF { 8 } else { 7 },
            seq: if c[5] == 0xFF { seq + 1 } else { seq },
            epoch: u64::from(c[6] % 8),
            offset: u64::from(u16::from_le_bytes([c[7], c[8]])) * 16,
            len: if kind == RecordKind::Write {
                payload as u64
            } else {
                u64::from(c[9]) * 64
            },
            payload_len: payload as u32,
            total_len: total as u32,
            payload_crc: crc32c::crc32c(&rec[REC_HDR..REC_HDR + payload]),
        };
        r.encode(&mut rec);
        if c[10] == 0xFF {
            let bit = usize::from(c[11]) % (rec.len() * 8);
            rec[bit / 8] ^= 1 << (bit % 8);
        }
        let p = phys(pos, CAP) as usize;
        file[p..p + rec.len()].copy_from_slice(&rec);
        pos += total;
        seq += 1;
    }
    open(file);
});
