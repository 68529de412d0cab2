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
