//! The node's HTTP endpoint: `/health` (200 once the node has joined the metadata group and
//! every local replica has caught up with what its leader committed; 503 before, with the
//! reason) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::async_runtime::WatchReceiver;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::control::reconciler::IN_SYNC_LAG_MAX;
use crate::control::reconciler::in_sync;
use crate::service::BrokerState;
use crate::status::is_quiescent;

type Labels = Vec<(String, String)>;

pub fn router(state: Arc<BrokerState>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<BrokerState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // The connection cap always; TLS when `[tls] http = true`.
    let tls = match &state.tls {
        Some(m) if m.http => Some(tokio_rustls::TlsAcceptor::from(
            m.server_config(false, &[b"http/1.1"]).map_err(|e| std::io::Error::other(format!("{e:#}")))?,
        )),
        _ => None,
    };
    let guard = crate::security::tls::Guard {
        listener: "http",
        tls,
        max_connections: state.config.max_connections,
        handshake_timeout: crate::security::tls::HANDSHAKE_TIMEOUT,
        metrics: state.metrics.clone(),
        plaintext_answer: crate::security::tls::PlaintextAnswer::Close,
    };
    let incoming = crate::security::tls::guard(crate::env::tcp_incoming(listener), guard);
    axum::serve(Guarded(incoming), router(state)).with_graceful_shutdown(cancel.cancelled_owned()).await
}

/// A guarded listener (see `security::tls::guard`) as axum takes it.
struct Guarded(crate::env::Incoming);

impl axum::serve::Listener for Guarded {
    type Io = crate::env::BoxedIo;
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt;
        loop {
            match self.0.next().await {
                Some(Ok(io)) => {
                    let addr = io.info.remote;
                    return (io, addr);
                }
                Some(Err(e)) => tracing::debug!("http listener: accept failed: {e}"),
                // The guard's stream ends only with its listener, which lives as long as this.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(None)
    }
}

/// Why the node is not ready yet, if it is not.
pub fn not_ready(s: &BrokerState) -> Option<String> {
    if !s.meta.is_ready() {
        return Some("not yet part of the metadata group".into());
    }
    for g in s.replicas.all() {
        let m = g.raft().metrics().borrow_watched().clone();
        if m.current_leader.is_none() {
            return Some(format!("{}/{} has no leader", g.topic(), g.partition()));
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let committed = m.cluster_committed.map_or(0, |l| l.index);
        if applied + IN_SYNC_LAG_MAX < committed {
            return Some(format!(
                "{}/{} is catching up ({applied} of {committed} applied)",
                g.topic(),
                g.partition()
            ));
        }
    }
    None
}

async fn health(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    match not_ready(&s) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Renders the node's metrics in the Prometheus text format.
pub fn render(s: &BrokerState) -> String {
    let mut reg = Registry::default();
    s.metrics.register(&mut reg);
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(not_ready(s).is_none()));
    reg.register("eddy_node_ready", "1 once the node is in the metadata group and caught up", ready);
    let hw = Family::<Labels, Gauge>::default();
    let lso = Family::<Labels, Gauge>::default();
    let leader = Family::<Labels, Gauge>::default();
    let bytes = Family::<Labels, Gauge>::default();
    let lag = Family::<Labels, Gauge>::default();
    let view = s.meta.view();
    let (mut leaders, mut replicas, mut under_replicated, mut quiescent) = (0i64, 0i64, 0i64, 0i64);
    for g in s.replicas.all() {
        let st = g.status();
        quiescent += i64::from(is_quiescent(&g.raft().metrics().borrow_watched(), &s.liveness));
        let labels = vec![
            ("topic".to_string(), g.topic().to_string()),
            ("partition".to_string(), g.partition().to_string()),
        ];
        hw.get_or_create(&labels).set(gauge(st.progress.next_offset));
        lso.get_or_create(&labels).set(gauge(st.progress.log_start_offset));
        leader.get_or_create(&labels).set(i64::from(st.is_leader));
        bytes.get_or_create(&labels).set(gauge(g.log_bytes()));
        replicas += 1;
        if !st.is_leader {
            continue;
        }
        leaders += 1;
        let m = g.raft().metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        for (follower, matched) in m.replication.iter().flatten() {
            if *follower == s.me {
                continue;
            }
            let mut l = labels.clone();
            l.push(("follower".to_string(), follower.to_string()));
            lag.get_or_create(&l).set(gauge(last.saturating_sub(matched.map_or(0, |x| x.index))));
        }
        let sync = in_sync(&m);
        let desired = view.partition_of(g.group()).map(|(_, _, p)| p.desired().to_vec()).unwrap_or_default();
        if desired.iter().any(|r| !sync.contains(r)) {
            under_replicated += 1;
        }
    }
    reg.register("eddy_partition_high_watermark", "Committed offset bound of this replica", hw);
    reg.register("eddy_partition_log_start_offset", "First offset this replica serves", lso);
    reg.register("eddy_partition_is_leader", "1 if this node leads the partition", leader);
    reg.register("eddy_partition_segment_bytes", "Bytes in the partition's log segments on this node", bytes);
    reg.register("eddy_partition_replication_lag", "Log entries a follower is behind this leader", lag);
    let l = Gauge::<i64>::default();
    l.set(leaders);
    reg.register("eddy_node_leaders", "Partitions this node leads", l);
    let r = Gauge::<i64>::default();
    r.set(replicas);
    reg.register("eddy_node_replicas", "Partition replicas on this node", r);
    let d = Gauge::<i64>::default();
    d.set(i64::try_from(s.replicas.damaged().len()).unwrap_or(i64::MAX));
    reg.register(
        "eddy_replicas_damaged",
        "Partition replicas placed on this node that do not run because their log is damaged (move them away)",
        d,
    );
    let u = Gauge::<i64>::default();
    u.set(under_replicated);
    reg.register(
        "eddy_under_replicated_partitions",
        "Partitions led by this node with a replica out of sync",
        u,
    );
    let groups = Family::<Labels, Gauge>::default();
    groups.get_or_create(&vec![("state".to_string(), "quiescent".to_string())]).set(quiescent);
    groups.get_or_create(&vec![("state".to_string(), "active".to_string())]).set(replicas - quiescent);
    reg.register(
        "eddy_raft_groups",
        "Partition replicas on this node by state: quiescent (nothing to replicate, apply or elect) or active",
        groups,
    );
    let live = s.liveness.stats();
    let sent = Family::<Labels, Counter>::default();
    let up = Family::<Labels, Gauge>::default();
    for (peer, n) in &live.heartbeats_sent {
        let l = vec![("peer".to_string(), peer.to_string())];
        sent.get_or_create(&l).inc_by(*n);
        up.get_or_create(&l).set(i64::from(!live.down.contains(peer)));
    }
    reg.register(
        "eddy_liveness_heartbeats_sent",
        "Node liveness probes (UDP) sent to each peer (one per pair of nodes, whatever the partitions)",
        sent,
    );
    reg.register("eddy_liveness_peer_up", "1 while the peer answers liveness probes", up);
    let offsets = Family::<Labels, Gauge>::default();
    for (peer, ms) in &live.clock_offsets {
        offsets.get_or_create(&vec![("peer".to_string(), peer.to_string())]).set(*ms);
    }
    reg.register(
        "eddy_clock_offset_ms",
        "How far each peer's clock is ahead of this node's (negative: behind), as its last probe answer measured it",
        offsets,
    );
    let elections = Counter::<u64>::default();
    elections.inc_by(live.elections);
    reg.register(
        "eddy_liveness_elections",
        "Campaigns this node started because a partition's leader was judged down or unknown",
        elections,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

async fn metrics(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], render(&s))
}
