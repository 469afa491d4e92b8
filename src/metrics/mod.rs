//! Prometheus metrics (`prometheus-client`), off unless `[metrics] listen`
//! is set.
//!
//! Owns the metric names and a tiny HTTP/1.1 endpoint (`http.rs`). Holds no
//! state of its own and shares none: every scrape builds a fresh registry
//! from the read-only views the agent and the BGP speaker already publish
//! (the agent's `Status` answer, its `ReconcileStats` watch, the sessions'
//! status watches), so the values are those `l3hv status --json` and
//! `l3hv peers --json` show. Never writes to the agent or the sessions.
//!
//! ```text
//!  GET /metrics ─► http ─► render ─┬─ agent.call(Status)          (routes, vms, rib)
//!                                  ├─ agent.subscribe_reconcile()  (totals, histogram)
//!                                  └─ bgp.peers()                  (per session)
//! ```

pub mod http;

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::agent::status::RECONCILE_BUCKETS;
use crate::agent::{AgentHandle, ApiError, Command, ReconcileStats, Status};
use crate::bgp::{BgpHandle, SessionStatus};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics listener {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: agent: {0}")]
    Agent(#[from] ApiError),
    #[error("metrics: encode: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// The read-only views a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub agent: AgentHandle,
    pub bgp: BgpHandle,
    pub reconcile: watch::Receiver<Arc<ReconcileStats>>,
}

impl Sources {
    pub fn new(agent: AgentHandle, bgp: BgpHandle) -> Self {
        let reconcile = agent.subscribe_reconcile();
        Self {
            agent,
            bgp,
            reconcile,
        }
    }

    /// One scrape: the OpenMetrics text of every metric.
    pub async fn scrape(&self) -> Result<String, MetricsError> {
        let status = self.agent.call(|reply| Command::Status { reply }).await?;
        let stats = self.reconcile.borrow().clone();
        encode(&status, &self.bgp.peers(), &stats)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    session: String,
    fabric: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    session: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    write: String,
}

/// A histogram from counts accumulated elsewhere (the agent owns them).
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, per-bucket count); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    /// From the agent's per-bucket (not cumulative) counts, one per
    /// [`RECONCILE_BUCKETS`] bound and the last for +Inf (missing ones 0).
    fn over_reconcile_buckets(sum: std::time::Duration, count: u64, per_bucket: &[u64]) -> Self {
        let buckets = RECONCILE_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(per_bucket.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        Self {
            sum: sum.as_secs_f64(),
            count,
            buckets,
        }
    }
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }
    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

const STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

/// PURE: the metrics text of one scrape.
pub fn encode(
    status: &Status,
    peers: &[SessionStatus],
    stats: &ReconcileStats,
) -> Result<String, MetricsError> {
    let mut r = Registry::with_prefix("l3hv");
    let gauge = |v: usize| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));

    // A gauge, not an OpenMetrics info: the Prometheus text format (and
    // promtool) know no info type.
    let build = Family::<VersionLabels, Gauge>::default();
    build
        .get_or_create(&VersionLabels {
            version: status.version.clone(),
        })
        .set(1);
    r.register("build_info", "Version of the running agent", build);
    r.register("vms", "VMs in the agent's intent", gauge(status.vms));
    r.register(
        "interfaces",
        "VM interfaces in the agent's intent",
        gauge(status.interfaces.len()),
    );
    r.register(
        "routes_installed",
        "VM routes the last reconcile left installed in the kernel",
        gauge(status.routes_programmed),
    );
    r.register(
        "routes_pending",
        "VM routes waiting for their interface to exist (a tap QEMU has not opened yet)",
        gauge(status.routes_pending),
    );
    r.register(
        "routes_failed",
        "VM routes the kernel refused in the last reconcile",
        gauge(status.routes_failed),
    );
    r.register(
        "rib_paths",
        "Paths learned by BGP, in the RIB",
        gauge(status.rib_paths),
    );
    r.register(
        "rib_prefixes",
        "Prefixes with a selected learned route",
        gauge(status.rib_prefixes),
    );
    let uplinks = Family::<UplinkLabels, Gauge>::default();
    for u in &status.uplinks {
        uplinks
            .get_or_create(&UplinkLabels {
                interface: u.interface.clone(),
                fabric: u.fabric.clone(),
                path: u.path.clone(),
            })
            .set(i64::from(u.present));
    }
    r.register(
        "uplink_present",
        "1 when the uplink interface exists",
        uplinks,
    );

    // DHCP, DHCPv6, RA and the NS responder, per VM interface.
    if let Some(services) = &status.services {
        let answers = Family::<ServiceLabels, Counter>::default();
        let dropped = Family::<DropLabels, Counter>::default();
        for i in &services.interfaces {
            for (service, n) in [
                ("dhcp", i.dhcp_served),
                ("dhcpv6", i.dhcpv6_served),
                ("ra", i.ra_sent),
                ("rs", i.rs_answered),
                ("ns", i.nd_answered),
            ] {
                answers
                    .get_or_create(&ServiceLabels {
                        interface: i.interface.clone(),
                        service: service.into(),
                    })
                    .inc_by(n);
            }
            for (reason, n) in &i.dropped {
                dropped
                    .get_or_create(&DropLabels {
                        interface: i.interface.clone(),
                        reason: reason.clone(),
                    })
                    .inc_by(*n);
            }
        }
        r.register(
            "vm_service_answers",
            "DHCP/DHCPv6 replies, RAs sent, RSs and NSs answered per VM interface",
            answers,
        );
        r.register(
            "vm_packets_dropped",
            "Packets from VMs dropped, by interface and protocol.reason",
            dropped,
        );
    }

    // Reconcile.
    r.register(
        "reconcile_runs",
        "Reconcile passes since the agent started",
        ConstCounter::new(stats.passes),
    );
    r.register(
        "reconcile_scoped_runs",
        "Reconcile passes over the changed learned prefixes alone",
        ConstCounter::new(stats.scoped),
    );
    r.register(
        "reconcile_full_runs",
        "Reconcile passes that dumped the whole kernel",
        ConstCounter::new(stats.full),
    );
    r.register(
        "reconcile_errors",
        "Reconcile passes that could not run (kernel dump failed)",
        ConstCounter::new(stats.errors),
    );
    let ops = Family::<ResultLabels, Counter>::default();
    ops.get_or_create(&ResultLabels {
        result: "applied".into(),
    })
    .inc_by(stats.operations_applied);
    ops.get_or_create(&ResultLabels {
        result: "failed".into(),
    })
    .inc_by(stats.operations_failed);
    r.register(
        "reconcile_operations",
        "Kernel operations applied or refused by reconcile passes",
        ops,
    );
    r.register_with_unit(
        "reconcile_duration",
        "Duration of reconcile passes (dump, plan, apply)",
        Unit::Seconds,
        ConstHistogram::over_reconcile_buckets(
            stats.duration_sum,
            stats.passes,
            &stats.duration_buckets,
        ),
    );
    r.register_with_unit(
        "intent_call_duration",
        "Intent changes (libvirt hook, D-Bus, CLI): from the agent taking the call to its answer, local reconcile included",
        Unit::Seconds,
        ConstHistogram::over_reconcile_buckets(
            stats.intent_call_sum,
            stats.intent_call_buckets.iter().sum(),
            &stats.intent_call_buckets,
        ),
    );
    r.register_with_unit(
        "failover_duration",
        "Failover fast paths: from a lost path (session down, BFD Down, a reflector's withdrawals) to the kernel acknowledging the nexthop groups changed",
        Unit::Seconds,
        ConstHistogram::over_reconcile_buckets(
            stats.failover_sum,
            stats.failovers,
            &stats.failover_buckets,
        ),
    );
    let writes = Family::<WriteLabels, Counter>::default();
    writes
        .get_or_create(&WriteLabels {
            write: "object_deleted".into(),
        })
        .inc_by(stats.failover_objects_deleted);
    writes
        .get_or_create(&WriteLabels {
            write: "group_replaced".into(),
        })
        .inc_by(stats.failover_groups_replaced);
    r.register(
        "failover_writes",
        "Kernel writes of failover fast paths: member objects deleted (no per-route work) and nexthop groups replaced",
        writes,
    );
    if let Some(last) = &stats.last {
        r.register_with_unit(
            "reconcile_last",
            "Unix time of the last reconcile pass",
            Unit::Other("timestamp_seconds".into()),
            ConstGauge::new(i64::try_from(last.at_unix).unwrap_or(i64::MAX)),
        );
    }

    // BGP sessions.
    let up = Family::<SessionLabels, Gauge>::default();
    let state = Family::<StateLabels, Gauge>::default();
    let received = Family::<SessionLabels, Gauge>::default();
    let advertised = Family::<SessionLabels, Gauge>::default();
    let sent = Family::<SessionLabels, Counter>::default();
    let notif_in = Family::<SessionLabels, Counter>::default();
    let updates_in = Family::<SessionLabels, Counter>::default();
    let updates_out = Family::<SessionLabels, Counter>::default();
    let established = Family::<SessionLabels, Counter>::default();
    let withdraw = Family::<SessionLabels, Counter>::default();
    let bfd_up = Family::<SessionLabels, Gauge>::default();
    let bfd_failures = Family::<SessionLabels, Counter>::default();
    let bfd_ups = Family::<SessionLabels, Counter>::default();
    let bfd_in = Family::<SessionLabels, Counter>::default();
    let bfd_out = Family::<SessionLabels, Counter>::default();
    let bfd_dropped = Family::<SessionLabels, Counter>::default();
    for p in peers {
        let l = SessionLabels {
            session: p.peer.name.clone(),
            fabric: p.peer.fabric.clone(),
            path: p.peer.path.clone(),
        };
        let current = format!("{:?}", p.state);
        up.get_or_create(&l)
            .set(i64::from(current == "Established"));
        for s in STATES {
            state
                .get_or_create(&StateLabels {
                    session: l.session.clone(),
                    state: s.to_string(),
                })
                .set(i64::from(s == current));
        }
        received
            .get_or_create(&l)
            .set(i64::try_from(p.prefixes_received).unwrap_or(i64::MAX));
        advertised
            .get_or_create(&l)
            .set(i64::try_from(p.prefixes_advertised).unwrap_or(i64::MAX));
        let c = &p.counters;
        sent.get_or_create(&l).inc_by(c.notifications_out);
        notif_in.get_or_create(&l).inc_by(c.notifications_in);
        updates_in.get_or_create(&l).inc_by(c.updates_in);
        updates_out.get_or_create(&l).inc_by(c.updates_out);
        established
            .get_or_create(&l)
            .inc_by(c.established_transitions);
        withdraw.get_or_create(&l).inc_by(c.treated_as_withdraw);
        if let Some(b) = &p.bfd {
            bfd_up
                .get_or_create(&l)
                .set(i64::from(b.state == crate::bfd::packet::State::Up));
            bfd_failures.get_or_create(&l).inc_by(b.failures);
            bfd_ups.get_or_create(&l).inc_by(b.up_transitions);
            bfd_in.get_or_create(&l).inc_by(b.packets_in);
            bfd_out.get_or_create(&l).inc_by(b.packets_out);
            bfd_dropped
                .get_or_create(&l)
                .inc_by(b.dropped.values().sum());
        }
    }
    r.register(
        "bfd_session_up",
        "1 when the BFD session of the BGP session is Up",
        bfd_up,
    );
    r.register(
        "bfd_session_failures",
        "BFD sessions that were Up and went down (each took BGP down)",
        bfd_failures,
    );
    r.register(
        "bfd_session_up_transitions",
        "Times the BFD session came Up",
        bfd_ups,
    );
    r.register(
        "bfd_packets_received",
        "BFD control packets accepted",
        bfd_in,
    );
    r.register("bfd_packets_sent", "BFD control packets sent", bfd_out);
    r.register(
        "bfd_packets_dropped",
        "BFD control packets dropped (malformed, TTL, authentication)",
        bfd_dropped,
    );
    r.register(
        "bgp_session_up",
        "1 when the BGP session is Established",
        up,
    );
    r.register(
        "bgp_session_state",
        "1 for the current RFC 4271 state of the BGP session",
        state,
    );
    r.register(
        "bgp_prefixes_received",
        "Prefixes accepted from the peer (Adj-RIB-In)",
        received,
    );
    r.register(
        "bgp_prefixes_advertised",
        "Prefixes announced to the peer (Adj-RIB-Out)",
        advertised,
    );
    r.register("bgp_notifications_sent", "NOTIFICATION messages sent", sent);
    r.register(
        "bgp_notifications_received",
        "NOTIFICATION messages received",
        notif_in,
    );
    r.register(
        "bgp_updates_received",
        "UPDATE messages received",
        updates_in,
    );
    r.register("bgp_updates_sent", "UPDATE messages sent", updates_out);
    r.register(
        "bgp_established_transitions",
        "Times the session reached Established",
        established,
    );
    r.register(
        "bgp_treated_as_withdraw",
        "UPDATEs treated as withdraw (RFC 7606)",
        withdraw,
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// PURE: the Prometheus text format (0.0.4) of OpenMetrics text, for
/// scrapers that do not ask for OpenMetrics (curl, promtool, older
/// Prometheus): counter families are named with their `_total` suffix,
/// `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    interface: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    interface: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UplinkLabels {
    interface: String,
    fabric: String,
    path: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ReconcileReport;
    use std::time::Duration;

    fn status() -> Status {
        Status {
            hypervisor: "hv1".into(),
            version: "0.1.0".into(),
            uptime_seconds: 3,
            vms: 2,
            uplinks: vec![],
            interfaces: vec![],
            routes_programmed: 5,
            routes_pending: 0,
            routes_failed: 1,
            rib_paths: 7,
            rib_prefixes: 4,
            last_reconcile: None,
            reconcile_passes: 0,
            reconcile_scoped_passes: 0,
            reconcile_full_passes: 0,
            nexthops: Default::default(),
            services: None,
        }
    }

    #[test]
    fn names_follow_conventions() {
        let mut stats = ReconcileStats::default();
        stats.record(&ReconcileReport {
            duration: Duration::from_millis(3),
            applied: 4,
            ..Default::default()
        });
        stats.record_failover(Duration::from_micros(400), 1, 0);
        let text = encode(&status(), &[], &stats).unwrap();
        for line in [
            "l3hv_failover_duration_seconds_count 1",
            "l3hv_failover_duration_seconds_bucket{le=\"0.0005\"} 1",
            "l3hv_failover_writes_total{write=\"object_deleted\"} 1",
            "l3hv_failover_writes_total{write=\"group_replaced\"} 0",
            "l3hv_vms 2",
            "l3hv_routes_installed 5",
            "l3hv_routes_failed 1",
            "l3hv_rib_paths 7",
            "l3hv_reconcile_runs_total 1",
            "l3hv_reconcile_operations_total{result=\"applied\"} 4",
            "# TYPE l3hv_reconcile_duration_seconds histogram",
            "l3hv_reconcile_duration_seconds_count 1",
            "l3hv_reconcile_duration_seconds_bucket{le=\"0.005\"} 1",
            "l3hv_reconcile_duration_seconds_bucket{le=\"0.0025\"} 0",
            "l3hv_reconcile_duration_seconds_bucket{le=\"+Inf\"} 1",
            "l3hv_build_info{version=\"0.1.0\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let prom = to_prometheus_text(&text);
        for line in [
            "# HELP l3hv_reconcile_runs_total Reconcile passes since the agent started.",
            "# TYPE l3hv_reconcile_runs_total counter",
            "l3hv_reconcile_runs_total 1",
            "# TYPE l3hv_reconcile_duration_seconds histogram",
        ] {
            assert!(prom.lines().any(|l| l == line), "{line} missing in\n{prom}");
        }
        assert!(!prom.contains("# EOF") && !prom.contains("# UNIT"));
    }

    #[test]
    fn vm_service_counters_are_exported() {
        let mut st = status();
        let mut dropped = std::collections::BTreeMap::new();
        dropped.insert("dhcp.malformed".to_string(), 3);
        st.services = Some(crate::services::ServicesStatus {
            interfaces: vec![crate::services::InterfaceCounters {
                interface: "tap1".into(),
                dhcp_served: 2,
                ra_sent: 5,
                nd_answered: 7,
                dropped,
                ..Default::default()
            }],
        });
        let text = encode(&st, &[], &ReconcileStats::default()).unwrap();
        for line in [
            "l3hv_vm_service_answers_total{interface=\"tap1\",service=\"dhcp\"} 2",
            "l3hv_vm_service_answers_total{interface=\"tap1\",service=\"ra\"} 5",
            "l3hv_vm_service_answers_total{interface=\"tap1\",service=\"ns\"} 7",
            "l3hv_vm_packets_dropped_total{interface=\"tap1\",reason=\"dhcp.malformed\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
