//! Frames over real sockets, with an authenticated but misbehaving peer
//! that holds the session keys and writes whatever bytes it likes.

// Helpers outside #[test] functions unwrap too: a failure there is a test
// failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::{cfg, evil_initiator};
use understudy_peer::wire::{HEADER_LEN, MAC_LEN, encode_error, error_code};
use understudy_peer::{Link, MsgType, PeerError};

/// Seal a frame with the evil session and flip one bit at `bit` (counted
/// from the start of the frame), then check the real link rejects it.
fn flipped(bit_of: impl Fn(usize) -> usize) -> PeerError {
    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let mut f = session
        .sealer
        .seal_to_vec(0x0101, b"sixteen byte pay")
        .unwrap();
    let bit = bit_of(f.len());
    f[bit / 8] ^= 1 << (bit % 8);
    evil.write_all(&f).unwrap();
    let e = link.recv().unwrap_err();
    // The link is dead afterwards, even for a good frame.
    let good = session.sealer.seal_to_vec(0x0101, b"x").unwrap();
    let _ = evil.write_all(&good);
    assert!(matches!(link.recv(), Err(PeerError::LinkDead)));
    e
}

#[test]
fn flipped_bit_in_header_payload_or_mac_is_an_integrity_error() {
    // Which bit to flip, given the frame length.
    type BitAt = fn(usize) -> usize;
    let cases: [(&str, BitAt); 6] = [
        ("length", |_| 3),
        ("type", |_| 4 * 8 + 7),
        ("sequence", |_| 15 * 8),
        ("header check", |_| 20 * 8 + 1),
        ("payload", |_| (HEADER_LEN + 5) * 8 + 2),
        ("mac", |len| len * 8 - 1),
    ];
    for (name, at) in cases {
        let e = flipped(at);
        assert!(
            matches!(e, PeerError::Integrity { seq: 0 }),
            "{name}: {e:?}"
        );
        assert!(
            e.to_string().contains("failed its integrity check"),
            "{name}"
        );
    }
}

#[test]
fn length_flipped_upwards_fails_at_once_instead_of_waiting() {
    // Setting a high bit of the length: without the header check the
    // receiver would wait for ~2 GiB that never come.
    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let mut f = session.sealer.seal_to_vec(0x0101, b"abc").unwrap();
    f[0] ^= 0x40;
    evil.write_all(&f).unwrap();
    let start = Instant::now();
    assert!(matches!(link.recv(), Err(PeerError::Integrity { .. })));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn replayed_and_reordered_frames_are_sequence_errors() {
    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let f0 = session.sealer.seal_to_vec(0x0101, b"zero").unwrap();
    evil.write_all(&f0).unwrap();
    assert_eq!(link.recv().unwrap().payload, b"zero");
    evil.write_all(&f0).unwrap(); // replay
    let e = link.recv().unwrap_err();
    assert!(
        matches!(
            e,
            PeerError::Sequence {
                expected: 1,
                got: 0
            }
        ),
        "{e:?}"
    );

    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let f0 = session.sealer.seal_to_vec(0x0101, b"zero").unwrap();
    let f1 = session.sealer.seal_to_vec(0x0101, b"one").unwrap();
    evil.write_all(&f1).unwrap(); // reordered
    evil.write_all(&f0).unwrap();
    let e = link.recv().unwrap_err();
    assert!(
        matches!(
            e,
            PeerError::Sequence {
                expected: 0,
                got: 1
            }
        ),
        "{e:?}"
    );
}

#[test]
fn oversize_frame_is_refused_before_the_payload_is_read() {
    let mut c = cfg("real", 0);
    c.max_payload = 64 * 1024;
    let (mut evil, mut session, mut link) = evil_initiator(c);
    // The sealer knows the real side's limit and refuses...
    assert_eq!(session.sealer.peer_max_payload(), 64 * 1024);
    assert!(matches!(
        session.sealer.seal(0x0101, &[&vec![0u8; 64 * 1024 + 1]]),
        Err(PeerError::PayloadTooLarge {
            len: 65537,
            max: 65536
        })
    ));
    // ...so lift that guard and send only the header of a 4 MiB frame: the
    // real link must refuse from the header alone, without waiting for or
    // allocating the payload.
    session.sealer.override_peer_max_payload(u32::MAX);
    let big = vec![0u8; 4 << 20];
    let sealed = session.sealer.seal(0x0101, &[&big]).unwrap();
    evil.write_all(&sealed.header).unwrap();
    let start = Instant::now();
    let e = link.recv().unwrap_err();
    assert!(
        matches!(e, PeerError::FrameTooLarge { len, max: 65536 } if len == 4 << 20),
        "{e:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn payload_over_the_peers_limit_is_refused_locally_and_the_link_survives() {
    let mut small = cfg("small", 0);
    small.max_payload = 64 * 1024;
    let (addr, h) = common::serve_one(small);
    let client = Link::connect(&addr, &cfg("client", 0), "migrate").unwrap();
    let mut server = h.join().unwrap().unwrap();
    let e = client.send(0x0101, &vec![0u8; 64 * 1024 + 1]).unwrap_err();
    assert!(matches!(e, PeerError::PayloadTooLarge { .. }), "{e:?}");
    client.send(0x0101, &vec![1u8; 64 * 1024]).unwrap();
    assert_eq!(server.recv().unwrap().payload.len(), 64 * 1024);
}

#[test]
fn peer_errors_and_goodbye_reach_the_application() {
    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let err = session
        .sealer
        .seal_to_vec(
            MsgType::Error.into(),
            &encode_error(error_code::BUSY, "busy\nnow"),
        )
        .unwrap();
    evil.write_all(&err).unwrap();
    let e = link.recv().unwrap_err();
    assert!(
        matches!(&e, PeerError::Remote { code: 3, message } if message == "busy?now"),
        "{e:?}"
    );
    // A Remote error does not kill the link; keepalives are skipped.
    let ka = session
        .sealer
        .seal_to_vec(MsgType::Keepalive.into(), b"")
        .unwrap();
    let data = session.sealer.seal_to_vec(0x0200, b"after error").unwrap();
    evil.write_all(&ka).unwrap();
    evil.write_all(&data).unwrap();
    assert_eq!(link.recv().unwrap().payload, b"after error");

    let bye = session
        .sealer
        .seal_to_vec(MsgType::Goodbye.into(), b"migration done")
        .unwrap();
    evil.write_all(&bye).unwrap();
    let e = link.recv().unwrap_err();
    assert!(e.is_clean_close(), "{e:?}");
    assert_eq!(e.to_string(), "peer closed the link: migration done");
}

#[test]
fn unknown_link_types_and_bad_error_payloads_are_protocol_errors() {
    for (t, payload) in [(0x0000u16, &b""[..]), (0x0042, b""), (0x0001, b"\0\0")] {
        let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
        let f = session.sealer.seal_to_vec(t, payload).unwrap();
        evil.write_all(&f).unwrap();
        let e = link.recv().unwrap_err();
        assert!(matches!(e, PeerError::Protocol { .. }), "{t:#x}: {e:?}");
    }
}

#[test]
fn application_cannot_send_link_control_types() {
    let (_evil, _session, link) = evil_initiator(cfg("real", 0));
    for t in [0u16, 1, 2, 3, 0x00ff] {
        assert!(matches!(
            link.send(t, b""),
            Err(PeerError::ReservedType { .. })
        ));
    }
    link.send(0x0100, b"ok").unwrap();
}

#[test]
fn eof_between_and_inside_frames() {
    let (evil, _session, mut link) = evil_initiator(cfg("real", 0));
    evil.shutdown(Shutdown::Write).unwrap();
    assert!(matches!(link.recv(), Err(PeerError::Disconnected)));

    let (mut evil, mut session, mut link) = evil_initiator(cfg("real", 0));
    let f = session.sealer.seal_to_vec(0x0101, &[1u8; 100]).unwrap();
    evil.write_all(&f[..HEADER_LEN + 50]).unwrap();
    evil.shutdown(Shutdown::Write).unwrap();
    assert!(matches!(link.recv(), Err(PeerError::Truncated)));

    let (mut evil, _session, mut link) = evil_initiator(cfg("real", 0));
    evil.write_all(&[0u8; HEADER_LEN - 1]).unwrap();
    evil.shutdown(Shutdown::Write).unwrap();
    assert!(matches!(link.recv(), Err(PeerError::Truncated)));
}

#[test]
fn silent_peer_after_handshake_times_out() {
    let mut c = cfg("real", 0);
    c.read_timeout = Some(Duration::from_millis(300));
    c.keepalive = None;
    let (_evil, _session, mut link) = evil_initiator(c);
    let start = Instant::now();
    let e = link.recv().unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, PeerError::RecvTimeout { .. }), "{e:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(matches!(link.recv(), Err(PeerError::LinkDead)));
}

#[test]
fn peer_that_stops_reading_makes_send_time_out() {
    let mut c = cfg("real", 0);
    c.write_timeout = Some(Duration::from_millis(300));
    let (evil, _session, link) = evil_initiator(c);
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0usize;
    let e = loop {
        match link.send(0x0101, &chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) => break e,
        }
        assert!(sent < 512 << 20, "socket buffers cannot hold this much");
    };
    assert!(matches!(e, PeerError::SendTimeout { .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(link.send(0x0101, b"x"), Err(PeerError::LinkDead)));
    drop(evil);
}

#[test]
fn mac_and_header_lengths_match_the_docs() {
    let (_evil, mut session, _link) = evil_initiator(cfg("real", 0));
    let f = session.sealer.seal_to_vec(0x0101, &[0u8; 10]).unwrap();
    assert_eq!(f.len(), HEADER_LEN + 10 + MAC_LEN);
    assert_eq!(HEADER_LEN, 24);
    assert_eq!(&f[0..4], &10u32.to_be_bytes());
    assert_eq!(&f[4..6], &0x0101u16.to_be_bytes());
    assert_eq!(&f[6..8], &[0, 0]);
    assert_eq!(&f[8..16], &0u64.to_be_bytes());
}
