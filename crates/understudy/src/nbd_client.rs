//! A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO, simple
//! replies, one request at a time). It exists so `understudy demo nbd` needs no
//! external tool; the tests drive the server with qemu-io, qemu-img, nbdinfo
//! and nbdcopy instead.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail, ensure};
use understudy_nbd_proto::wire::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_GO, OPTION_REPLY_MAGIC, REP_ACK, REP_FLAG_ERROR, REP_INFO,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Largest option reply payload this client accepts.
const MAX_OPT_REPLY: u32 = 64 << 10;

/// An open NBD connection.
#[derive(Debug)]
pub struct NbdClient {
    sock: TcpStream,
    size: u64,
    next_handle: u64,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl NbdClient {
    /// Connect to `addr` and open `export`.
    pub fn connect(addr: &str, export: &str) -> Result<Self> {
        let mut sock =
            TcpStream::connect(addr).with_context(|| format!("connecting to NBD server {addr}"))?;
        sock.set_nodelay(true)?;
        let mut greet = [0u8; 18];
        sock.read_exact(&mut greet)?;
        ensure!(
            be_u64(&greet) == NBDMAGIC && be_u64(&greet[8..]) == IHAVEOPT,
            "not an NBD newstyle server"
        );
        ensure!(
            be_u16(&greet[16..]) & FLAG_FIXED_NEWSTYLE != 0,
            "server lacks fixed newstyle"
        );
        sock.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        // NBD_OPT_GO: name length, name, zero info requests.
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h)?;
            ensure!(be_u64(&h) == OPTION_REPLY_MAGIC, "bad option reply magic");
            let rtype = be_u32(&h[12..]);
            let len = be_u32(&h[16..]);
            ensure!(
                len <= MAX_OPT_REPLY,
                "option reply of {len} bytes is too long"
            );
            let mut data = vec![0u8; len as usize];
            sock.read_exact(&mut data)?;
            if rtype & REP_FLAG_ERROR != 0 {
                bail!(
                    "server refused export {export:?}: {}",
                    String::from_utf8_lossy(&data)
                );
            }
            match rtype {
                REP_INFO if data.len() >= 12 && be_u16(&data) == INFO_EXPORT => {
                    size = Some(be_u64(&data[2..]));
                }
                REP_ACK => break,
                _ => {}
            }
        }
        Ok(Self {
            sock,
            size: size.context("server sent no export size")?,
            next_handle: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.sock.write_all(&req)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64) -> Result<()> {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r)?;
        ensure!(be_u32(&r) == SIMPLE_REPLY_MAGIC, "bad reply magic");
        ensure!(be_u64(&r[8..]) == handle, "reply for an unknown request");
        let err = be_u32(&r[4..]);
        ensure!(err == 0, "server returned NBD error {err}");
        Ok(())
    }

    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len()).context("write too large")?;
        let h = self.request(CMD_WRITE, offset, len, data)?;
        self.reply(h)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = u32::try_from(buf.len()).context("read too large")?;
        let h = self.request(CMD_READ, offset, len, &[])?;
        self.reply(h)?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    /// Flush.
    pub fn flush(&mut self) -> Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply(h)
    }
}
