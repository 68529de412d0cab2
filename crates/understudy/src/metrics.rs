//! `serve --metrics ADDR`: a Prometheus `/metrics` endpoint.
//!
//! Nothing is counted twice: a custom collector reads, at scrape time, the
//! NBD server's per-export counters (relaxed atomics updated on the data
//! path) and the same state the control API reports (`export.list`,
//! `migration.status`, `vm.list`). `prometheus-client` encodes it in the
//! Prometheus text format; [`http`] answers the scrapes. The metric names
//! are listed in docs/security.md ("Metrics").

mod http;

use std::sync::{Arc, Weak};

use anyhow::Result;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use understudy_migration::{Phase, Status};
use understudy_nbd_server::{ExportStats, LATENCY_BUCKETS_NS, Stats};

use crate::control::proto::{ExportEntry, JournalEntry, Request, VmEntry};
use crate::control::server::Handler;
use crate::serve::Daemon;

pub use http::{Endpoint, bind};

/// Every migration phase, for the `phase` state set.
const PHASES: [Phase; 9] = [
    Phase::Connecting,
    Phase::Bulk,
    Phase::Iterating,
    Phase::Mirroring,
    Phase::Switchover,
    Phase::Verifying,
    Phase::Completed,
    Phase::Failed,
    Phase::Cancelled,
];

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Connecting => "connecting",
        Phase::Bulk => "bulk",
        Phase::Iterating => "iterating",
        Phase::Mirroring => "mirroring",
        Phase::Switchover => "switchover",
        Phase::Verifying => "verifying",
        Phase::Completed => "completed",
        Phase::Failed => "failed",
        Phase::Cancelled => "cancelled",
    }
}

const VM_STATES: [&str; 4] = ["running", "paused", "exited", "unknown"];

/// Serve `/metrics` for `daemon` on `listener` (from [`bind`]) until
/// [`Endpoint::stop`].
pub fn start(listener: std::net::TcpListener, daemon: &Arc<Daemon>) -> Result<Endpoint> {
    let mut registry = Registry::with_prefix("understudy");
    registry.register_collector(Box::new(DaemonCollector {
        daemon: Arc::downgrade(daemon),
    }));
    Endpoint::start(listener, registry)
}

/// Reads the daemon's state on each scrape. Weak: the endpoint must not
/// keep a stopping daemon alive.
#[derive(Debug)]
struct DaemonCollector {
    daemon: Weak<Daemon>,
}

/// What one scrape reports, gathered before encoding starts.
struct Snapshot {
    server: Stats,
    nbd: Vec<(String, ExportStats)>,
    exports: Vec<ExportEntry>,
    migrations: Vec<Status>,
    vms: Vec<VmEntry>,
}

/// A control-API answer, decoded; `None` (logged) when the method fails,
/// for example `vm.list` on a daemon without `--vm-dir`.
fn query<T: DeserializeOwned>(daemon: &Daemon, method: &str) -> Option<T> {
    let resp = daemon.handle(&Request {
        id: 0,
        method: method.into(),
        params: serde_json::json!({}),
    });
    let decoded = resp.result.map(serde_json::from_value::<T>);
    match decoded {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            tracing::warn!(method, "metrics: cannot decode the answer: {e}");
            None
        }
        None => {
            tracing::trace!(method, error = ?resp.error, "metrics: not reported");
            None
        }
    }
}

impl Snapshot {
    fn take(daemon: &Daemon) -> Self {
        let nbd = daemon.nbd();
        let registry = nbd.exports();
        let nbd_exports = registry
            .names()
            .into_iter()
            .filter_map(|n| registry.get(&n).map(|e| (n, e.stats())))
            .collect();
        Self {
            server: nbd.stats(),
            nbd: nbd_exports,
            exports: query(daemon, "export.list").unwrap_or_default(),
            migrations: query(daemon, "migration.status").unwrap_or_default(),
            vms: query(daemon, "vm.list").unwrap_or_default(),
        }
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(
            "build_info",
            "Always 1; the version label names the running build",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
            .encode_gauge(&1u64)?;
        // Without a daemon (stopping) only the build is reported.
        let Some(daemon) = self.daemon.upgrade() else {
            return Ok(());
        };
        let s = Snapshot::take(&daemon);
        drop(daemon);
        encode_server(&mut enc, &s.server)?;
        encode_requests(&mut enc, &s.nbd)?;
        encode_latency(&mut enc, &s.nbd)?;
        encode_exports(&mut enc, &s.exports)?;
        encode_migrations(&mut enc, &s.migrations)?;
        encode_vms(&mut enc, &s.vms)
    }
}

/// One family: a descriptor and one sample per item.
fn family<T>(
    enc: &mut DescriptorEncoder<'_>,
    (name, help, ty): (&str, &str, MetricType),
    items: impl IntoIterator<Item = T>,
    mut sample: impl FnMut(&mut MetricEncoder<'_>, T) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for item in items {
        sample(&mut m, item)?;
    }
    Ok(())
}

fn counter(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], v: u64) -> std::fmt::Result {
    m.encode_family(&labels)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    m: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    v: V,
) -> std::fmt::Result {
    m.encode_family(&labels)?.encode_gauge(&v)
}

/// A gauge family read from one field: name, help, the field.
type Row<T> = (&'static str, &'static str, fn(&T) -> u64);

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

fn encode_server(enc: &mut DescriptorEncoder<'_>, s: &Stats) -> std::fmt::Result {
    let rows: [(&str, &str, u64); 4] = [
        (
            "nbd_connections_accepted",
            "NBD connections accepted since start",
            s.connections_accepted,
        ),
        (
            "nbd_connections_rejected",
            "NBD connections closed at once because the connection limit was reached",
            s.connections_rejected,
        ),
        (
            "nbd_handshakes_failed",
            "NBD handshakes that ended in an error or timeout",
            s.handshakes_failed,
        ),
        (
            "nbd_tls_sessions",
            "NBD connections upgraded to TLS",
            s.tls_sessions,
        ),
    ];
    for (name, help, v) in rows {
        family(enc, (name, help, COUNTER), [v], |m, v| counter(m, &[], v))?;
    }
    Ok(())
}

fn encode_requests(
    enc: &mut DescriptorEncoder<'_>,
    nbd: &[(String, ExportStats)],
) -> std::fmt::Result {
    let per_op = |f: fn(&understudy_nbd_server::OpStats) -> u64| {
        move |m: &mut MetricEncoder<'_>, (name, st): &(String, ExportStats)| {
            for o in &st.ops {
                counter(m, &[("export", name), ("op", o.op.as_str())], f(o))?;
            }
            Ok(())
        }
    };
    let requests = (
        "nbd_requests",
        "NBD requests answered, by export and op",
        COUNTER,
    );
    family(enc, requests, nbd, per_op(|o| o.requests))?;
    let errors = (
        "nbd_request_errors",
        "NBD requests answered with an error (refused or failed I/O)",
        COUNTER,
    );
    family(enc, errors, nbd, per_op(|o| o.errors))?;
    let per_export = |f: fn(&ExportStats) -> u64| {
        move |m: &mut MetricEncoder<'_>, (name, st): &(String, ExportStats)| {
            counter(m, &[("export", name)], f(st))
        }
    };
    let read = (
        "nbd_read_bytes",
        "Bytes returned by successful NBD reads",
        COUNTER,
    );
    family(enc, read, nbd, per_export(|s| s.bytes_read))?;
    let written = (
        "nbd_written_bytes",
        "Bytes stored by successful NBD writes",
        COUNTER,
    );
    family(enc, written, nbd, per_export(|s| s.bytes_written))?;
    let conns = (
        "nbd_connections",
        "NBD connections open on the export",
        GAUGE,
    );
    family(enc, conns, nbd, |m, (name, st)| {
        gauge(m, &[("export", name)], st.connections_active)
    })
}

fn encode_latency(
    enc: &mut DescriptorEncoder<'_>,
    nbd: &[(String, ExportStats)],
) -> std::fmt::Result {
    let desc = (
        "nbd_request_duration_seconds",
        "Time from an NBD request being read to its reply being sent",
        MetricType::Histogram,
    );
    family(enc, desc, nbd, |m, (name, st)| {
        for o in &st.ops {
            // Per-bucket counts: the encoder makes them cumulative.
            let buckets: [(f64, u64); LATENCY_BUCKETS_NS.len() + 1] = std::array::from_fn(|i| {
                let le = LATENCY_BUCKETS_NS
                    .get(i)
                    .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                (le, o.latency_buckets[i])
            });
            let sum = o.latency_sum_ns as f64 / 1e9;
            m.encode_family(&[("export", name.as_str()), ("op", o.op.as_str())])?
                .encode_histogram::<NoLabelSet>(sum, o.requests, &buckets, None)?;
        }
        Ok(())
    })
}

fn encode_exports(enc: &mut DescriptorEncoder<'_>, exports: &[ExportEntry]) -> std::fmt::Result {
    let dirty = (
        "bitmap_dirty_bytes",
        "Bytes a dirty bitmap marks as changed (dirty granules times granularity)",
        GAUGE,
    );
    family(enc, dirty, exports, |m, e| {
        for b in &e.bitmaps {
            gauge(
                m,
                &[("export", &e.name), ("bitmap", &b.name)],
                b.dirty_bytes,
            )?;
        }
        Ok(())
    })?;
    let journal: [Row<JournalEntry>; 5] = [
        (
            "journal_current_epoch",
            "The epoch journal's open epoch",
            |j| j.current_epoch,
        ),
        (
            "journal_durable_epoch",
            "Every epoch up to this one is durable",
            |j| j.durable_epoch,
        ),
        (
            "journal_applied_epoch",
            "Every epoch up to this one is applied to the image",
            |j| j.applied_epoch,
        ),
        ("journal_used_bytes", "Journal bytes in use", |j| j.used),
        ("journal_capacity_bytes", "Journal size", |j| j.capacity),
    ];
    for (name, help, f) in journal {
        family(enc, (name, help, GAUGE), exports, |m, e| match &e.journal {
            Some(j) => gauge(m, &[("export", &e.name)], f(j)),
            None => Ok(()),
        })?;
    }
    let serving = (
        "export_serving",
        "1 for the route the export's requests take: local, forwarded, pivoted or failed",
        GAUGE,
    );
    family(enc, serving, exports, |m, e| {
        gauge(m, &[("export", &e.name), ("route", &e.serving)], 1u64)
    })
}

fn encode_migrations(enc: &mut DescriptorEncoder<'_>, jobs: &[Status]) -> std::fmt::Result {
    let phase = (
        "migration_phase",
        "1 for the phase the export's latest migration is in, 0 for the others",
        GAUGE,
    );
    family(enc, phase, jobs, |m, st| {
        for p in PHASES {
            let on = u64::from(p == st.phase);
            gauge(m, &[("export", &st.export), ("phase", phase_name(p))], on)?;
        }
        Ok(())
    })?;
    let rows: [Row<Status>; 6] = [
        (
            "migration_copied_bytes",
            "Data bytes sent as extents by the latest migration",
            |s| s.data_bytes,
        ),
        (
            "migration_sent_bytes",
            "All bytes the latest migration sent on the link",
            |s| s.bytes_sent,
        ),
        (
            "migration_mirrored_bytes",
            "Guest write bytes mirrored by the latest migration",
            |s| s.mirrored_bytes,
        ),
        (
            "migration_dirty_bytes",
            "Dirty bytes the latest migration still has to send",
            |s| s.dirty_bytes,
        ),
        (
            "migration_rounds",
            "Iterative rounds of the latest migration",
            |s| u64::from(s.rounds),
        ),
        (
            "migration_bandwidth_bytes_per_second",
            "Measured copy bandwidth",
            |s| s.bandwidth,
        ),
    ];
    for (name, help, f) in rows {
        family(enc, (name, help, GAUGE), jobs, |m, st| {
            gauge(m, &[("export", &st.export)], f(st))
        })?;
    }
    let downtime = (
        "migration_downtime_seconds",
        "I/O hold time of the latest migration's switch-over",
        GAUGE,
    );
    family(enc, downtime, jobs, |m, st| match st.downtime_ms {
        Some(ms) => gauge(m, &[("export", &st.export)], ms / 1e3),
        None => Ok(()),
    })
}

fn encode_vms(enc: &mut DescriptorEncoder<'_>, vms: &[VmEntry]) -> std::fmt::Result {
    let running = ("vm_running", "1 while the VM's QEMU runs the guest", GAUGE);
    family(enc, running, vms, |m, vm| {
        gauge(m, &[("vm", &vm.name)], u64::from(vm.state == "running"))
    })?;
    let state = (
        "vm_state",
        "1 for the VM's state (running, paused, exited, unknown), 0 for the others",
        GAUGE,
    );
    family(enc, state, vms, |m, vm| {
        for s in VM_STATES {
            gauge(
                m,
                &[("vm", &vm.name), ("state", s)],
                u64::from(vm.state == s),
            )?;
        }
        Ok(())
    })
}

/// The scrape body for `registry`, in the Prometheus text format.
pub(crate) fn render(registry: &Registry) -> String {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
        // Only a collector can fail (fmt::Error carries no reason).
        tracing::error!("encoding the metrics failed: {e}");
    }
    body
}
