//! Generation records and the connect decision, after DRBD's generation
//! UUIDs (`drbd_uuid_compare()`).
//!
//! Each copy of a replicated disk keeps, in `IMAGE.replica` beside the
//! image, a [`GenRecord`]: its role, and three kinds of generation ids
//! ([`Generations`]):
//!
//! * `current`: the id of the data this copy holds now;
//! * `bitmap`: the `current` both copies shared when this copy started
//!   tracking changes for its peer in a bitmap (0: not tracking);
//! * `history`: older ids, newest first (at most [`HISTORY_LEN`]).
//!
//! A primary that loses its peer, and a backup that is promoted, start a
//! new `current` ([`Generations::new_current`]): the old one becomes the
//! bitmap id. On every connect [`decide`] compares both copies' ids and
//! answers, without I/O, what has to happen ([`Decision`]). When the two
//! copies diverged (split brain) nothing is overwritten unless the
//! operator set an [`AfterSplitBrain`] policy, which [`resolve_split_brain`]
//! applies.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, RecordError};

/// Most history ids kept.
pub const HISTORY_LEN: usize = 4;
/// Largest record file read.
pub const MAX_RECORD_LEN: u64 = 64 * 1024;
const MAGIC: &str = "USREP1";

/// The role of one copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves clients and sends their writes to the backup.
    Primary,
    /// Receives the primary's writes; clients may not write.
    Backup,
}

/// The generation ids of one copy (0 means "none").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The id of the data this copy holds now.
    pub current: u64,
    /// The `current` both copies shared when this copy started tracking
    /// changes in its per-peer bitmap (0: not tracking).
    pub bitmap: u64,
    /// Older ids, newest first, at most [`HISTORY_LEN`].
    pub history: Vec<u64>,
}

impl Generations {
    /// The ids of a copy that has data of its own: a fresh current, no
    /// bitmap, no history.
    pub fn fresh(current: u64) -> Self {
        Self {
            current,
            bitmap: 0,
            history: Vec::new(),
        }
    }

    fn push_history(&mut self, id: u64) {
        if id == 0 || self.history.first() == Some(&id) {
            return;
        }
        self.history.insert(0, id);
        self.history.truncate(HISTORY_LEN);
    }

    /// Start a new generation (`fresh`, non-zero): the data is about to
    /// diverge from what the peer holds. The old current becomes the bitmap
    /// id (an older bitmap id moves to the history, as in DRBD).
    pub fn new_current(&mut self, fresh: u64) {
        let old_bitmap = self.bitmap;
        self.push_history(old_bitmap);
        self.bitmap = self.current;
        self.current = fresh;
    }

    /// The resync source's step when a resync finished: both copies hold
    /// `current`; the bitmap id moves to the history.
    pub fn sync_done_source(&mut self) {
        let b = self.bitmap;
        self.push_history(b);
        self.bitmap = 0;
    }

    /// The resync target's step when a resync from `source` finished: this
    /// copy now holds the source's data, so it takes the source's ids.
    pub fn sync_done_target(&mut self, source: &Generations) {
        self.current = source.current;
        self.bitmap = 0;
        self.history = source.history.clone();
        self.history.truncate(HISTORY_LEN);
    }
}

/// What one side tells the other on connect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenState {
    /// The generation ids.
    pub gens: Generations,
    /// This copy was primary and stopped without a clean shutdown: writes
    /// it acknowledged may be missing on the peer (its per-peer bitmap,
    /// crash safe, says where).
    pub crashed_primary: bool,
}

/// Which way data moves, from the deciding side's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This copy is the source; the peer is overwritten.
    ToPeer,
    /// The peer is the source; this copy is overwritten.
    FromPeer,
}

impl Direction {
    /// The same movement seen from the other side.
    pub fn mirror(self) -> Self {
        match self {
            Direction::ToPeer => Direction::FromPeer,
            Direction::FromPeer => Direction::ToPeer,
        }
    }
}

/// What the generation ids say on connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Both copies hold the same data.
    NoSync,
    /// One copy is an older state of the other, whose bitmap says what
    /// changed since: send only the marked blocks.
    SyncFromBitmap {
        /// Which way.
        direction: Direction,
    },
    /// One copy is an ancestor of the other but no bitmap covers the gap:
    /// compare everything (a checksum resync sends only differing blocks).
    FullSync {
        /// Which way.
        direction: Direction,
    },
    /// Both copies changed since they were last the same. `recoverable`:
    /// they diverged from one common state, so an after-split-brain policy
    /// may pick a side; otherwise only the operator can.
    SplitBrain {
        /// An [`AfterSplitBrain`] policy may resolve it.
        recoverable: bool,
    },
    /// No common history: the copies are of different disks. Refused.
    Unrelated,
}

impl Decision {
    /// The same decision seen from the other side.
    pub fn mirror(self) -> Self {
        match self {
            Decision::SyncFromBitmap { direction } => Decision::SyncFromBitmap {
                direction: direction.mirror(),
            },
            Decision::FullSync { direction } => Decision::FullSync {
                direction: direction.mirror(),
            },
            other => other,
        }
    }
}

/// Compare this copy's ids with the peer's (DRBD's rules, in order):
///
/// 1. a copy that never held data (`current` 0) is fully synced from the
///    other (both empty: nothing to do);
/// 2. equal `current`: no sync, unless one side is a crashed primary, which
///    then sends its bitmap;
/// 3. the peer's bitmap id is my current: I am the target of a bitmap
///    resync (and the mirror case); both at once is a split brain;
/// 4. my current is in the peer's history: I am the target of a full sync
///    (and the mirror case); both at once is a split brain;
/// 5. equal non-zero bitmap ids: both went on from one state (recoverable
///    split brain);
/// 6. a common id among bitmap ids and histories: split brain, not
///    recoverable by policy;
/// 7. otherwise the data is unrelated.
pub fn decide(local: &GenState, peer: &GenState) -> Decision {
    use Decision::*;
    use Direction::*;
    let (l, p) = (&local.gens, &peer.gens);
    match (l.current == 0, p.current == 0) {
        (true, true) => return NoSync,
        (true, false) => {
            return FullSync {
                direction: FromPeer,
            };
        }
        (false, true) => return FullSync { direction: ToPeer },
        (false, false) => {}
    }
    if l.current == p.current {
        return match (local.crashed_primary, peer.crashed_primary) {
            (false, false) => NoSync,
            (true, false) => SyncFromBitmap { direction: ToPeer },
            (false, true) => SyncFromBitmap {
                direction: FromPeer,
            },
            // Two primaries of one generation cannot both have written in
            // a single-primary pair; refuse to guess.
            (true, true) => SplitBrain { recoverable: true },
        };
    }
    let i_behind = p.bitmap != 0 && p.bitmap == l.current;
    let peer_behind = l.bitmap != 0 && l.bitmap == p.current;
    match (i_behind, peer_behind) {
        (true, false) => {
            return SyncFromBitmap {
                direction: FromPeer,
            };
        }
        (false, true) => return SyncFromBitmap { direction: ToPeer },
        (true, true) => return SplitBrain { recoverable: false },
        (false, false) => {}
    }
    let i_ancestor = p.history.contains(&l.current);
    let peer_ancestor = l.history.contains(&p.current);
    match (i_ancestor, peer_ancestor) {
        (true, false) => {
            return FullSync {
                direction: FromPeer,
            };
        }
        (false, true) => return FullSync { direction: ToPeer },
        (true, true) => return SplitBrain { recoverable: false },
        (false, false) => {}
    }
    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return SplitBrain { recoverable: true };
    }
    let ancestors = |g: &Generations| {
        std::iter::once(g.bitmap)
            .chain(g.history.iter().copied())
            .filter(|&id| id != 0)
            .collect::<Vec<_>>()
    };
    let (al, ap) = (ancestors(l), ancestors(p));
    if al.iter().any(|id| ap.contains(id)) {
        return SplitBrain { recoverable: false };
    }
    Unrelated
}

/// What to do after a split brain (the operator's choice; DRBD's
/// `after-sb-*pri` policies, reduced to those that never guess).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AfterSplitBrain {
    /// Report it and stay disconnected. Default.
    #[default]
    Disconnect,
    /// Discard the changes of the copy promoted last.
    DiscardYounger,
    /// Discard the copy that wrote nothing since the split (if both wrote,
    /// disconnect).
    DiscardZeroChanges,
    /// Discard the changes of the copy on this node.
    DiscardNode(String),
}

/// A policy name that is not one of [`AfterSplitBrain`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown after-split-brain policy {0:?}: use disconnect, discard-younger, \
     discard-zero-changes or discard-node NODE"
)]
pub struct UnknownPolicy(pub String);

impl FromStr for AfterSplitBrain {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "disconnect" => return Ok(Self::Disconnect),
            "discard-younger" => return Ok(Self::DiscardYounger),
            "discard-zero-changes" => return Ok(Self::DiscardZeroChanges),
            _ => {}
        }
        let node = s
            .strip_prefix("discard-node")
            .map(|r| r.trim_start_matches([' ', '=']).trim())
            .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace));
        match node {
            Some(n) => Ok(Self::DiscardNode(n.to_owned())),
            None => Err(UnknownPolicy(s.to_owned())),
        }
    }
}

impl fmt::Display for AfterSplitBrain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disconnect => f.write_str("disconnect"),
            Self::DiscardYounger => f.write_str("discard-younger"),
            Self::DiscardZeroChanges => f.write_str("discard-zero-changes"),
            Self::DiscardNode(n) => write!(f, "discard-node {n}"),
        }
    }
}

/// What a split-brain policy looks at, for one copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitFacts {
    /// The copy's node id.
    pub node: String,
    /// Bytes it changed since the split (its per-peer bitmap).
    pub changed_bytes: u64,
    /// When it last became primary (milliseconds since the Unix epoch; 0:
    /// never).
    pub promoted_at_ms: u64,
}

/// The outcome of a split-brain policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Stay disconnected; the operator decides.
    Disconnect,
    /// This copy's changes are discarded: it becomes the resync target.
    DiscardLocal,
    /// The peer's changes are discarded: it becomes the resync target.
    DiscardPeer,
}

impl Resolution {
    /// The same outcome seen from the other side.
    pub fn mirror(self) -> Self {
        match self {
            Resolution::DiscardLocal => Resolution::DiscardPeer,
            Resolution::DiscardPeer => Resolution::DiscardLocal,
            Resolution::Disconnect => Resolution::Disconnect,
        }
    }
}

/// Apply `policy` to a split brain between `local` and `peer`. Both sides
/// compute the same answer (mirrored); ties disconnect, except two copies
/// that both changed nothing, where the larger node id yields (their data
/// is the same).
pub fn resolve_split_brain(
    policy: &AfterSplitBrain,
    local: &SplitFacts,
    peer: &SplitFacts,
) -> Resolution {
    use Resolution::*;
    match policy {
        AfterSplitBrain::Disconnect => Disconnect,
        AfterSplitBrain::DiscardYounger => match local.promoted_at_ms.cmp(&peer.promoted_at_ms) {
            std::cmp::Ordering::Greater => DiscardLocal,
            std::cmp::Ordering::Less => DiscardPeer,
            std::cmp::Ordering::Equal => Disconnect,
        },
        AfterSplitBrain::DiscardZeroChanges => {
            match (local.changed_bytes == 0, peer.changed_bytes == 0) {
                (true, false) => DiscardLocal,
                (false, true) => DiscardPeer,
                (false, false) => Disconnect,
                (true, true) => match local.node.cmp(&peer.node) {
                    std::cmp::Ordering::Greater => DiscardLocal,
                    std::cmp::Ordering::Less => DiscardPeer,
                    std::cmp::Ordering::Equal => Disconnect,
                },
            }
        }
        AfterSplitBrain::DiscardNode(n) => match (&local.node == n, &peer.node == n) {
            (true, false) => DiscardLocal,
            (false, true) => DiscardPeer,
            _ => Disconnect,
        },
    }
}

/// A resync that has started and not finished (it resumes on the next
/// connect: the bitmap still holds what is left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncMarker {
    /// The peer node.
    pub peer: String,
    /// This copy is the source (true) or the target.
    pub source: bool,
}

/// The persisted record of one copy (`IMAGE.replica`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRecord {
    /// Export name.
    pub name: String,
    /// The copy's role.
    pub role: Role,
    /// Generation ids.
    pub gens: Generations,
    /// The peer node id, once paired.
    #[serde(default)]
    pub peer: Option<String>,
    /// A resync in progress.
    #[serde(default)]
    pub resync: Option<ResyncMarker>,
    /// Set while a primary runs; a primary that finds it set at start
    /// crashed (see [`GenState::crashed_primary`]).
    #[serde(default)]
    pub primary_open: bool,
    /// When this copy last became primary (ms since the Unix epoch).
    #[serde(default)]
    pub promoted_at_ms: u64,
    /// The split brain last detected and not yet resolved.
    #[serde(default)]
    pub split_brain: bool,
}

impl GenRecord {
    /// A new record for a copy of `name` in `role`, with `gens`.
    pub fn new(name: &str, role: Role, gens: Generations) -> Self {
        Self {
            name: name.to_owned(),
            role,
            gens,
            peer: None,
            resync: None,
            primary_open: false,
            promoted_at_ms: 0,
            split_brain: false,
        }
    }

    /// What this copy announces on connect.
    pub fn state(&self, crashed_primary: bool) -> GenState {
        GenState {
            gens: self.gens.clone(),
            crashed_primary,
        }
    }
}

/// A fresh non-zero random generation id.
pub fn new_id() -> u64 {
    let mut b = [0u8; 8];
    // A failing RNG leaves the time as the id: still unique enough to
    // tell generations of one disk apart.
    if getrandom::fill(&mut b).is_err() {
        let t = now_ms().to_be_bytes();
        b.copy_from_slice(&t);
    }
    u64::from_be_bytes(b) | 1
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Path of the record beside `image`: `IMAGE.replica`.
pub fn record_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".replica");
    PathBuf::from(s)
}

/// Encode a record to its file bytes: `USREP1 <crc32c>\n<json>\n`.
pub fn encode(r: &GenRecord) -> Vec<u8> {
    // Serialising plain data cannot fail.
    let json = serde_json::to_vec(r).unwrap_or_default();
    let mut out = format!("{MAGIC} {:08x}\n", crc32c::crc32c(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

/// Decode file bytes, checking magic and CRC.
pub fn decode(bytes: &[u8]) -> Result<GenRecord, DecodeError> {
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(DecodeError::TooLarge {
            max: MAX_RECORD_LEN,
        });
    }
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(DecodeError::NoHeader)?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| DecodeError::HeaderNotText)?;
    let (magic, crc) = header.split_once(' ').ok_or(DecodeError::MalformedHeader)?;
    if magic != MAGIC {
        return Err(DecodeError::Magic {
            found: magic.chars().take(16).collect(),
        });
    }
    let crc = u32::from_str_radix(crc, 16).map_err(|_| DecodeError::MalformedChecksum)?;
    let body = &bytes[nl + 1..];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if crc32c::crc32c(body) != crc {
        return Err(DecodeError::Checksum);
    }
    let r: GenRecord =
        serde_json::from_slice(body).map_err(|source| DecodeError::Json { source })?;
    if r.gens.history.len() > HISTORY_LEN {
        return Err(DecodeError::History {
            len: r.gens.history.len(),
        });
    }
    Ok(r)
}

/// Read the record of `image`; `None` if there is none.
pub fn load(image: &Path) -> Result<Option<GenRecord>, RecordError> {
    let path = record_path(image);
    let bytes = match understudy_durable::read_capped(&path, MAX_RECORD_LEN) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|source| RecordError::Corrupt { path, source })
}

/// Write the record of `image` atomically and durably.
pub fn store(image: &Path, r: &GenRecord) -> Result<(), RecordError> {
    let path = record_path(image);
    understudy_durable::replace(&path, &encode(r))
        .map_err(|source| RecordError::Write { path, source })
}

#[cfg(test)]
mod tests;
