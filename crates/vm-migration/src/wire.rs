//! Messages of the VM link and the RAM link's first frame.
//!
//! Message types live in the peer link's unassigned range (0x0400..): the
//! VM link carries only these; the RAM link carries one [`Msg::Attach`]
//! and then the memsync checkpoint protocol (0x0200..). Structured
//! messages are JSON; device-state chunks are raw bytes.

use serde::{Deserialize, Serialize};
use understudy_peer::{Frame, Link, LinkSender};

use crate::VmMigrationError;

/// Peer-link purpose of the VM link.
pub const PURPOSE: &str = "vm-migrate";
/// Peer-link purpose of the RAM link.
pub const RAM_PURPOSE: &str = "vm-ram";

const HELLO: u16 = 0x0400;
const WELCOME: u16 = 0x0401;
const PREPARE: u16 = 0x0402;
const READY: u16 = 0x0403;
const STATE_DATA: u16 = 0x0404;
const STATE_END: u16 = 0x0405;
const LOADED: u16 = 0x0406;
const COMMIT: u16 = 0x0407;
const COMMITTED: u16 = 0x0408;
const ABORT: u16 = 0x0409;
const ATTACH: u16 = 0x040a;
const QUERY: u16 = 0x040b;
const ANSWER: u16 = 0x040c;

/// A disk of the VM and the export it is served as (moved by a disk job).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's name in the spec.
    pub name: String,
    /// The export behind it (same name on both daemons).
    pub export: String,
    /// Read-only disk.
    pub readonly: bool,
}

/// The source's first message: what is coming.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// The VM's name (the same on the target).
    pub vm: String,
    /// This migration's id (the RAM link names it).
    pub id: String,
    /// The VM's spec as TOML (the target rewrites its host paths).
    pub spec_toml: String,
    /// Guest RAM in bytes (the target's RAM file gets this size).
    pub ram_bytes: u64,
    /// The disks, moved by disk migration jobs before the switch-over.
    pub disks: Vec<DiskInfo>,
    /// The VM's lineage: fixed when it first started, kept across moves.
    pub lineage: String,
    /// Ownership generation the source holds; the target commits `+1`.
    pub generation: u64,
}

/// A message of the VM link (or the RAM link's first frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Source: the VM that is coming.
    Hello(Hello),
    /// Target: accepted; its node id.
    Welcome {
        /// The target's node id.
        node: String,
        /// The target holds an older RAM copy of this VM (same lineage):
        /// the RAM link starts with a hash comparison and sends only the
        /// pages that differ.
        incremental: bool,
    },
    /// Source: the disks are on the target; start the receiving QEMU.
    Prepare,
    /// Target: QEMU waits for the device state.
    Ready,
    /// Source: a chunk of QEMU's device-state stream.
    StateData(Vec<u8>),
    /// Source: the stream is complete; the RAM file holds checkpoint `ram_seq`.
    StateEnd {
        /// The last RAM checkpoint's sequence number.
        ram_seq: u64,
    },
    /// Target: QEMU loaded the device state; ready to commit.
    Loaded,
    /// Source: take ownership of the VM at `generation`.
    Commit {
        /// The new generation.
        generation: u64,
    },
    /// Target: the VM is owned here now (and resumes).
    Committed,
    /// Either side: the migration stops; the source keeps the VM.
    Abort {
        /// Why.
        reason: String,
    },
    /// Source, on a new VM link after a lost commit answer: does the
    /// target own this VM?
    Query {
        /// The VM.
        vm: String,
        /// Its lineage.
        lineage: String,
    },
    /// Target: the generation at which it owns and runs the VM (of that
    /// lineage), or `None`. Sent once no migration of the VM is in progress
    /// here, so the answer is final.
    Answer {
        /// The generation owned here.
        generation: Option<u64>,
    },
    /// RAM link, first frame: the migration it belongs to.
    Attach {
        /// The VM.
        vm: String,
        /// The migration id of its [`Hello`].
        id: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Text {
    #[serde(default)]
    node: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    vm: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    n: u64,
    #[serde(default)]
    owned: bool,
}

fn text(t: &Text) -> Vec<u8> {
    serde_json::to_vec(t).unwrap_or_default()
}

impl Msg {
    /// A short name for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Prepare => "Prepare",
            Msg::Ready => "Ready",
            Msg::StateData(_) => "StateData",
            Msg::StateEnd { .. } => "StateEnd",
            Msg::Loaded => "Loaded",
            Msg::Commit { .. } => "Commit",
            Msg::Committed => "Committed",
            Msg::Abort { .. } => "Abort",
            Msg::Attach { .. } => "Attach",
            Msg::Query { .. } => "Query",
            Msg::Answer { .. } => "Answer",
        }
    }

    /// Message type and payload.
    pub fn encode(&self) -> Result<(u16, Vec<u8>), VmMigrationError> {
        let t = |node: &str, reason: &str, vm: &str, id: &str, n: u64| {
            text(&Text {
                node: node.into(),
                reason: reason.into(),
                vm: vm.into(),
                id: id.into(),
                n,
                owned: false,
            })
        };
        Ok(match self {
            Msg::Hello(h) => (
                HELLO,
                serde_json::to_vec(h).map_err(|source| VmMigrationError::Encode {
                    what: "Hello",
                    source,
                })?,
            ),
            Msg::Welcome { node, incremental } => {
                (WELCOME, t(node, "", "", "", u64::from(*incremental)))
            }
            Msg::Prepare => (PREPARE, Vec::new()),
            Msg::Ready => (READY, Vec::new()),
            Msg::StateData(b) => (STATE_DATA, b.clone()),
            Msg::StateEnd { ram_seq } => (STATE_END, t("", "", "", "", *ram_seq)),
            Msg::Loaded => (LOADED, Vec::new()),
            Msg::Commit { generation } => (COMMIT, t("", "", "", "", *generation)),
            Msg::Committed => (COMMITTED, Vec::new()),
            Msg::Abort { reason } => (ABORT, t("", reason, "", "", 0)),
            Msg::Attach { vm, id } => (ATTACH, t("", "", vm, id, 0)),
            Msg::Query { vm, lineage } => (QUERY, t("", "", vm, lineage, 0)),
            Msg::Answer { generation } => (
                ANSWER,
                text(&Text {
                    node: String::new(),
                    reason: String::new(),
                    vm: String::new(),
                    id: String::new(),
                    n: generation.unwrap_or(0),
                    owned: generation.is_some(),
                }),
            ),
        })
    }

    /// Decode a received frame.
    pub fn decode(f: Frame) -> Result<Msg, VmMigrationError> {
        let text = |what| {
            serde_json::from_slice::<Text>(&f.payload)
                .map_err(|source| VmMigrationError::Decode { what, source })
        };
        Ok(match f.msg_type {
            HELLO => Msg::Hello(serde_json::from_slice(&f.payload).map_err(|source| {
                VmMigrationError::Decode {
                    what: "Hello",
                    source,
                }
            })?),
            WELCOME => {
                let t = text("Welcome")?;
                Msg::Welcome {
                    node: t.node,
                    incremental: t.n == 1,
                }
            }
            PREPARE => Msg::Prepare,
            READY => Msg::Ready,
            STATE_DATA => Msg::StateData(f.payload),
            STATE_END => Msg::StateEnd {
                ram_seq: text("StateEnd")?.n,
            },
            LOADED => Msg::Loaded,
            COMMIT => Msg::Commit {
                generation: text("Commit")?.n,
            },
            COMMITTED => Msg::Committed,
            ABORT => Msg::Abort {
                reason: text("Abort")?.reason,
            },
            ATTACH => {
                let t = text("Attach")?;
                Msg::Attach { vm: t.vm, id: t.id }
            }
            QUERY => {
                let t = text("Query")?;
                Msg::Query {
                    vm: t.vm,
                    lineage: t.id,
                }
            }
            ANSWER => {
                let t = text("Answer")?;
                Msg::Answer {
                    generation: t.owned.then_some(t.n),
                }
            }
            got => {
                return Err(VmMigrationError::Unexpected {
                    expected: "a VM migration message",
                    got,
                });
            }
        })
    }

    /// Send on a link.
    pub fn send(&self, tx: &LinkSender) -> Result<(), VmMigrationError> {
        let (ty, payload) = self.encode()?;
        tx.send(ty, &payload)
            .map_err(|source| VmMigrationError::Send {
                what: self.name(),
                source,
            })
    }

    /// Receive the next message; an [`Msg::Abort`] from the peer is
    /// returned as [`VmMigrationError::Refused`].
    pub fn recv(link: &mut Link, waiting_for: &'static str) -> Result<Msg, VmMigrationError> {
        let f = link.recv().map_err(|source| VmMigrationError::Recv {
            what: waiting_for,
            source,
        })?;
        match Msg::decode(f)? {
            Msg::Abort { reason } => Err(VmMigrationError::Refused { message: reason }),
            m => Ok(m),
        }
    }
}

/// Phase of a VM migration, as `vm.status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening the links.
    #[default]
    Connecting,
    /// Disk jobs and RAM pre-copy rounds run while the guest runs.
    Precopy,
    /// Guest paused: last RAM checkpoint, device state, commit.
    Switchover,
    /// The target owns and runs the VM.
    Completed,
    /// Stopped before the commit; the guest runs on the source.
    Failed,
    /// The commit's answer was lost: the guest stays paused on the source
    /// until an operator checks the target (docs/vm.md).
    InDoubt,
}

impl Phase {
    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::InDoubt)
    }
}

/// Progress of a VM migration (`vm.status` → `migration`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The VM.
    pub vm: String,
    /// Target address.
    pub to: String,
    /// Target node id, once known.
    pub target_node: Option<String>,
    /// The target had an older RAM copy: only differing pages are sent.
    pub incremental: bool,
    /// Phase.
    pub phase: Phase,
    /// RAM pre-copy rounds done.
    pub rounds: u32,
    /// Dirty pages found by the last round.
    pub last_dirty_pages: u64,
    /// Guest dirty rate seen by the last round (bytes per second).
    pub dirty_rate: u64,
    /// RAM checkpoint bytes sent (encoded).
    pub ram_bytes_sent: u64,
    /// Link throughput of the last round's checkpoint (bytes per second,
    /// encoded bytes over the time until the target's acknowledgement).
    pub bandwidth: u64,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Time of the last hash scan plus encode (ms): the floor of the pause.
    pub scan_ms: f64,
    /// Device-state bytes sent.
    pub state_bytes: u64,
    /// Per disk export: the disk job's phase.
    pub disks: Vec<(String, String)>,
    /// Throttle duty: percent of the time the guest is paused (0 = off).
    pub throttle_pct: u32,
    /// Pause seen by the source: from `stop` to the commit's answer (ms).
    pub downtime_ms: Option<f64>,
    /// Total time (ms).
    pub total_ms: f64,
    /// The error, when failed or in doubt.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_message_survives_encode_and_decode() {
        let hello = Hello {
            vm: "v".into(),
            id: "i".into(),
            spec_toml: "name = \"v\"".into(),
            ram_bytes: 1 << 27,
            disks: vec![DiskInfo {
                name: "root".into(),
                export: "v-root".into(),
                readonly: false,
            }],
            lineage: "l".into(),
            generation: 3,
        };
        let all = [
            Msg::Hello(hello),
            Msg::Welcome {
                node: "b".into(),
                incremental: true,
            },
            Msg::Prepare,
            Msg::Ready,
            Msg::StateData(vec![1, 2, 3]),
            Msg::StateEnd { ram_seq: 9 },
            Msg::Loaded,
            Msg::Commit { generation: 4 },
            Msg::Committed,
            Msg::Abort {
                reason: "why".into(),
            },
            Msg::Attach {
                vm: "v".into(),
                id: "i".into(),
            },
            Msg::Query {
                vm: "v".into(),
                lineage: "l".into(),
            },
            Msg::Answer {
                generation: Some(0),
            },
            Msg::Answer { generation: None },
        ];
        for m in all {
            let (msg_type, payload) = m.encode().unwrap();
            assert_eq!(Msg::decode(Frame { msg_type, payload }).unwrap(), m);
        }
    }

    #[test]
    fn foreign_or_malformed_frames_are_errors() {
        let f = |msg_type, payload: &[u8]| Frame {
            msg_type,
            payload: payload.to_vec(),
        };
        assert!(matches!(
            Msg::decode(f(0x0200, b"")),
            Err(VmMigrationError::Unexpected { got: 0x0200, .. })
        ));
        assert!(matches!(
            Msg::decode(f(HELLO, b"{")),
            Err(VmMigrationError::Decode { what: "Hello", .. })
        ));
        assert!(matches!(
            Msg::decode(f(COMMIT, b"not json")),
            Err(VmMigrationError::Decode { .. })
        ));
    }
}
