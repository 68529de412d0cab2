//! The ownership and generation record: `IMAGE.owner`, beside the image.
//!
//! ```text
//! USOWN1 <crc32c of the JSON, 8 hex digits>\n
//! {"disk_id": "...", "generation": 3, "state": {...}, "peers": [...]}\n
//! ```
//!
//! Written atomically (temporary file, fsync, rename, fsync of the
//! directory), read with a size cap, and checked against its CRC: a torn or
//! edited record is refused rather than guessed at. An image without a
//! record is a plain owned image (generation 0); the record is created on
//! the first migration.
//!
//! The record decides who owns a disk. There is never more than one owner:
//! the target writes `Owner` at generation `g + 1` before it answers the
//! commit, and the source writes `HandedOver` only after that answer; a
//! source that crashes between the two finds `Handing` and refuses to serve
//! until the operator has checked the target.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::RecordError;

/// Largest record file read.
pub const MAX_RECORD_LEN: u64 = 64 * 1024;
const MAGIC: &str = "USOWN1";

/// Who holds the disk, as this copy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OwnerState {
    /// This copy is the owner and may be served.
    Owner {
        /// A migration away that is in progress or was interrupted (resume
        /// it with the same id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migrating: Option<Outgoing>,
    },
    /// A commit was sent and its answer not yet recorded: the target may
    /// or may not own the disk now.
    Handing {
        /// Target node id.
        to: String,
        /// Migration id.
        migration_id: String,
    },
    /// Ownership went to `to` at `generation`.
    HandedOver {
        /// Target node id.
        to: String,
    },
    /// This copy is being received from `from` and is not servable yet.
    Receiving {
        /// Source node id.
        from: String,
        /// Migration id.
        migration_id: String,
    },
}

/// An outgoing migration in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Target node id.
    pub to: String,
    /// Migration id (hex).
    pub migration_id: String,
}

/// What this copy knows about another copy of the same disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The other copy's node id.
    pub node: String,
    /// Generation at which both copies were identical.
    pub generation: u64,
    /// The bitmap that records what changed here since then (only on the
    /// side that went on writing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// The record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// Identity of the disk's lineage (hex UUID), the same on every copy.
    pub disk_id: String,
    /// Bumped at every handover; the owner holds the highest.
    pub generation: u64,
    /// Ownership state.
    pub state: OwnerState,
    /// Export name the disk is served under.
    #[serde(default)]
    pub name: String,
    /// Other copies.
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
}

impl OwnerRecord {
    /// A fresh record for an owned disk.
    pub fn new_owned(name: &str) -> Self {
        Self {
            disk_id: new_id_hex(),
            generation: 1,
            state: OwnerState::Owner { migrating: None },
            name: name.to_owned(),
            peers: Vec::new(),
        }
    }

    /// The record of `node`, if any.
    pub fn peer(&self, node: &str) -> Option<&PeerRecord> {
        self.peers.iter().find(|p| p.node == node)
    }

    /// Replace (or add) the record of `p.node`.
    pub fn set_peer(&mut self, p: PeerRecord) {
        self.peers.retain(|q| q.node != p.node);
        self.peers.push(p);
    }

    /// Whether this copy may be served as the owner; the error says what to
    /// do otherwise.
    pub fn check_servable(&self, image: &Path) -> Result<(), RecordError> {
        match &self.state {
            OwnerState::Owner { .. } => Ok(()),
            OwnerState::HandedOver { to } => Err(RecordError::HandedOver {
                image: image.to_owned(),
                to: to.clone(),
                generation: self.generation,
            }),
            OwnerState::Handing { to, .. } => Err(RecordError::InDoubt {
                image: image.to_owned(),
                to: to.clone(),
            }),
            OwnerState::Receiving { from, .. } => Err(RecordError::Partial {
                image: image.to_owned(),
                from: from.clone(),
            }),
        }
    }
}

/// A fresh random id, as 32 hex digits.
pub fn new_id_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Parse a hex id into 16 bytes (the wire form).
pub fn id_bytes(hex: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(hex)
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}

/// The hex form of 16 id bytes.
pub fn id_hex(b: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*b).simple().to_string()
}

/// Path of the record beside `image`.
pub fn record_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(".owner");
    image.with_file_name(name)
}

/// Encode a record to its file bytes.
pub fn encode(r: &OwnerRecord) -> Vec<u8> {
    // Serialising plain data cannot fail.
    let json = serde_json::to_vec(r).unwrap_or_default();
    let mut out = format!("{MAGIC} {:08x}\n", crc32c::crc32c(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

/// Why record bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No newline ends the header.
    #[error("no header line")]
    NoHeader,
    /// The header is not UTF-8.
    #[error("header is not text")]
    HeaderNotText,
    /// The header is not `MAGIC CRC`.
    #[error("malformed header")]
    MalformedHeader,
    /// Another format (or version).
    #[error("unknown magic {found:?} (this build reads {MAGIC})")]
    Magic {
        /// The magic found.
        found: String,
    },
    /// The checksum is not 8 hex digits.
    #[error("malformed checksum")]
    MalformedChecksum,
    /// The body does not match its checksum.
    #[error("checksum mismatch (torn or edited file)")]
    Checksum,
    /// The body is not a record.
    #[error("malformed JSON")]
    Json {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file is larger than any record.
    #[error("larger than {max} bytes")]
    TooLarge {
        /// The cap.
        max: u64,
    },
}

/// Decode file bytes, checking magic and CRC.
pub fn decode(bytes: &[u8]) -> Result<OwnerRecord, DecodeError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(DecodeError::NoHeader)?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| DecodeError::HeaderNotText)?;
    let (magic, crc) = header.split_once(' ').ok_or(DecodeError::MalformedHeader)?;
    if magic != MAGIC {
        return Err(DecodeError::Magic {
            found: magic.into(),
        });
    }
    let crc = u32::from_str_radix(crc, 16).map_err(|_| DecodeError::MalformedChecksum)?;
    let body = &bytes[nl + 1..];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if crc32c::crc32c(body) != crc {
        return Err(DecodeError::Checksum);
    }
    serde_json::from_slice(body).map_err(|source| DecodeError::Json { source })
}

/// Read the record of `image`; `None` if there is none.
pub fn load(image: &Path) -> Result<Option<OwnerRecord>, RecordError> {
    let path = record_path(image);
    let bytes = match understudy_durable::read_capped(&path, MAX_RECORD_LEN) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(RecordError::Corrupt {
            path,
            source: DecodeError::TooLarge {
                max: MAX_RECORD_LEN,
            },
        });
    }
    decode(&bytes)
        .map(Some)
        .map_err(|source| RecordError::Corrupt { path, source })
}

/// Write the record of `image` atomically and durably (through
/// `IMAGE.owner.tmp`).
pub fn store(image: &Path, r: &OwnerRecord) -> Result<(), RecordError> {
    let path = record_path(image);
    understudy_durable::replace(&path, &encode(r))
        .map_err(|source| RecordError::Write { path, source })
}

/// The record of `image`, created (as an owned disk named `name`) if absent.
pub fn load_or_create(image: &Path, name: &str) -> Result<OwnerRecord, RecordError> {
    if let Some(r) = load(image)? {
        return Ok(r);
    }
    let r = OwnerRecord::new_owned(name);
    store(image, &r)?;
    Ok(r)
}

/// Check that `image` may be served as the owner (no record counts as
/// owned). Call before serving an image.
pub fn check_servable(image: &Path) -> Result<(), RecordError> {
    match load(image)? {
        None => Ok(()),
        Some(r) => r.check_servable(image),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut r = OwnerRecord::new_owned("vm");
        r.set_peer(PeerRecord {
            node: "b".into(),
            generation: 4,
            bitmap: Some("peer:b".into()),
        });
        let b = encode(&r);
        assert_eq!(decode(&b).expect("decode"), r);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x20;
            if c == b {
                continue;
            }
            // Any flipped byte is refused, or (a flipped hex letter's case)
            // decodes to the same record.
            if let Ok(d) = decode(&c) {
                assert_eq!(d, r, "byte {i}");
            }
        }
        assert!(decode(&b[..b.len() / 2]).is_err());
    }

    #[test]
    fn store_load_and_servable() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("d.img");
        assert!(load(&img).expect("load").is_none());
        assert!(check_servable(&img).is_ok());
        let mut r = load_or_create(&img, "d").expect("create");
        assert_eq!(load(&img).expect("load"), Some(r.clone()));
        r.state = OwnerState::HandedOver { to: "nodeB".into() };
        store(&img, &r).expect("store");
        let e = check_servable(&img).expect_err("handed over");
        let msg = e.to_string();
        assert!(msg.contains("nodeB") && msg.contains("migrate"), "{msg}");
        std::fs::write(record_path(&img), b"USOWN1 00000000\n{}\n").expect("write");
        assert!(matches!(load(&img), Err(RecordError::Corrupt { .. })));
    }
}
