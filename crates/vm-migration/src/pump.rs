//! QEMU's device-state stream carried over the VM link: the source reads
//! what QEMU's `migrate` writes to a Unix socket the source daemon owns
//! and sends it as [`Msg::StateData`] frames; the target writes the frames
//! into the Unix socket its QEMU's `migrate-incoming` listens on. No other
//! socket between the hosts carries it.

use std::io::{Read, Write};

use understudy_peer::{Link, LinkSender};

use crate::{Msg, VmMigrationError};

/// Bytes per StateData frame.
const CHUNK: usize = 256 * 1024;

/// Send everything `r` yields as StateData frames; returns the byte count.
pub fn send_stream(r: &mut impl Read, tx: &LinkSender) -> Result<u64, VmMigrationError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(VmMigrationError::StateStream {
                    doing: "reading QEMU's outgoing stream",
                    source,
                });
            }
        };
        Msg::StateData(buf[..n].to_vec()).send(tx)?;
        total += n as u64;
    }
}

/// Write StateData frames into `w` until StateEnd; returns the byte count
/// and StateEnd's RAM sequence number.
pub fn recv_stream(link: &mut Link, w: &mut impl Write) -> Result<(u64, u64), VmMigrationError> {
    let mut total = 0u64;
    loop {
        match Msg::recv(link, "device state")? {
            Msg::StateData(b) => {
                w.write_all(&b)
                    .map_err(|source| VmMigrationError::StateStream {
                        doing: "feeding the target QEMU",
                        source,
                    })?;
                total += b.len() as u64;
            }
            Msg::StateEnd { ram_seq } => return Ok((total, ram_seq)),
            m => {
                return Err(VmMigrationError::Unexpected {
                    expected: "StateData or StateEnd",
                    got: m.encode().map(|x| x.0).unwrap_or(0),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use understudy_peer::{PeerConfig, PeerKey};

    fn cfg(id: &str) -> PeerConfig {
        let mut c =
            PeerConfig::new(PeerKey::from_bytes(&(0u8..32).collect::<Vec<u8>>()).unwrap()).unwrap();
        c.node_id = id.into();
        c
    }

    #[test]
    fn a_stream_crosses_the_link_byte_for_byte() {
        let (a, mut b) = Link::pair(&cfg("a"), &cfg("b"), crate::PURPOSE).unwrap();
        let data: Vec<u8> = (0..(CHUNK * 2 + 123))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let tx = a.sender();
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let n = send_stream(&mut d2.as_slice(), &tx).unwrap();
            Msg::StateEnd { ram_seq: 7 }.send(&tx).unwrap();
            n
        });
        let mut out = Vec::new();
        let (n, seq) = recv_stream(&mut b, &mut out).unwrap();
        assert_eq!((n, seq), (data.len() as u64, 7));
        assert_eq!(t.join().unwrap(), n);
        assert_eq!(out, data);
        drop(a);
    }

    #[test]
    fn an_abort_in_the_stream_is_the_peer_refusing() {
        let (a, mut b) = Link::pair(&cfg("a"), &cfg("b"), crate::PURPOSE).unwrap();
        Msg::Abort {
            reason: "QEMU failed".into(),
        }
        .send(&a.sender())
        .unwrap();
        let e = recv_stream(&mut b, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, VmMigrationError::Refused { ref message } if message == "QEMU failed"));
    }
}
