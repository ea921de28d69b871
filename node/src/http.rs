//! The node's HTTP endpoint: `/health` (200 once the node has joined the metadata group, 503
//! before) and `/metrics` (Prometheus text). Only the production binary serves it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerState;

type Labels = Vec<(String, String)>;

pub fn router(state: Arc<BrokerState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<BrokerState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn health(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    if s.meta.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: not yet part of the metadata group\n",
        )
    }
}

/// Renders the node's metrics in the Prometheus text format.
pub fn render(s: &BrokerState) -> String {
    let mut reg = Registry::default();
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(s.meta.is_ready()));
    reg.register(
        "eddy_node_ready",
        "1 once the node has joined the metadata group",
        ready,
    );
    let hw = Family::<Labels, Gauge>::default();
    let lso = Family::<Labels, Gauge>::default();
    let leader = Family::<Labels, Gauge>::default();
    let bytes = Family::<Labels, Gauge>::default();
    let (mut leaders, mut replicas) = (0i64, 0i64);
    for g in s.groups.all() {
        let st = g.status();
        let labels = vec![
            ("topic".to_string(), g.topic().to_string()),
            ("partition".to_string(), g.partition().to_string()),
        ];
        hw.get_or_create(&labels)
            .set(i64::try_from(st.progress.next_offset).unwrap_or(i64::MAX));
        lso.get_or_create(&labels)
            .set(i64::try_from(st.progress.log_start_offset).unwrap_or(i64::MAX));
        leader.get_or_create(&labels).set(i64::from(st.is_leader));
        bytes
            .get_or_create(&labels)
            .set(i64::try_from(g.log_bytes()).unwrap_or(i64::MAX));
        replicas += 1;
        leaders += i64::from(st.is_leader);
    }
    reg.register(
        "eddy_partition_high_watermark",
        "Committed offset bound of this replica",
        hw,
    );
    reg.register(
        "eddy_partition_log_start_offset",
        "First offset this replica serves",
        lso,
    );
    reg.register(
        "eddy_partition_is_leader",
        "1 if this node leads the partition",
        leader,
    );
    reg.register(
        "eddy_partition_segment_bytes",
        "Bytes in the partition's log segments",
        bytes,
    );
    let l = Gauge::<i64>::default();
    l.set(leaders);
    reg.register("eddy_node_leaders", "Partitions this node leads", l);
    let r = Gauge::<i64>::default();
    r.set(replicas);
    reg.register("eddy_node_replicas", "Partition replicas on this node", r);
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

async fn metrics(State(s): State<Arc<BrokerState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&s),
    )
}
