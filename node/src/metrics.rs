//! The node's Prometheus metrics. Request counters and latency histograms are updated as work
//! happens; per-partition and per-node gauges are computed when `/metrics` is scraped.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, or the request's `eddy-error` code.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    /// The Kafka API's name, e.g. `Fetch`.
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// `client`, `raft`, `kafka` or `http`.
    pub listener: String,
    /// Why: `no_credentials`, `bad_token`, `unknown_user`, `not_a_node`, `node_not_member`,
    /// `plaintext`, `handshake`, `handshake_timeout`, `sasl`, `connection_limit`, `denied`.
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Metrics updated on the request and storage paths. Cloning shares them.
#[derive(Clone)]
pub struct NodeMetrics {
    pub produce_requests: Family<ResultLabel, Counter>,
    pub produce_records: Counter,
    /// Raft entries proposed for produce requests; fewer than the requests when queued requests
    /// are coalesced.
    pub produce_entries: Counter,
    /// Produce batches those entries carried (a batch proposed again after it overtook an
    /// earlier one counts again, as its entry does): more than the entries when batches were
    /// coalesced.
    pub produce_entry_batches: Counter,
    pub produce_latency: Histogram,
    pub fetch_requests: Family<ResultLabel, Counter>,
    pub fetch_records: Counter,
    pub fetch_latency: Histogram,
    /// From proposing a batch to its being committed and applied on the leader.
    pub commit_latency: Histogram,
    pub fsync_latency: Histogram,
    /// How long the metadata state machine took to apply one batch of entries (decode, apply,
    /// persist, publish the new view).
    pub meta_apply_latency: Histogram,
    /// Kafka listener: requests by API, records served and accepted, and fetches sent to a
    /// replica in the client's rack (KIP-392).
    pub kafka_requests: Family<ApiLabel, Counter>,
    pub kafka_fetch_records: Counter,
    pub kafka_produce_records: Counter,
    pub kafka_read_replica_redirects: Counter,
    /// Authentication failures and refused connections, by listener and reason (never with
    /// the credentials that failed).
    pub auth_failures: Family<RefusalLabel, Counter>,
    /// Requests refused because no ACL allows them, by listener.
    pub authorization_denials: Family<RefusalLabel, Counter>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let m = Self {
            produce_requests: Family::default(),
            produce_records: Counter::default(),
            produce_entries: Counter::default(),
            produce_entry_batches: Counter::default(),
            produce_latency: latency_histogram(),
            fetch_requests: Family::default(),
            fetch_records: Counter::default(),
            fetch_latency: latency_histogram(),
            commit_latency: latency_histogram(),
            fsync_latency: latency_histogram(),
            meta_apply_latency: latency_histogram(),
            kafka_requests: Family::default(),
            kafka_fetch_records: Counter::default(),
            kafka_produce_records: Counter::default(),
            kafka_read_replica_redirects: Counter::default(),
            auth_failures: Family::default(),
            authorization_denials: Family::default(),
        };
        // A series that exists from the start, at zero: rate() works from the first scrape,
        // and the family is there on a node that has not served a request yet.
        let ok = ResultLabel { result: "ok".to_owned() };
        drop(m.produce_requests.get_or_create(&ok));
        drop(m.fetch_requests.get_or_create(&ok));
        m
    }
}

impl NodeMetrics {
    pub fn auth_failure(&self, listener: &str, reason: &str) {
        self.auth_failures
            .get_or_create(&RefusalLabel { listener: listener.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.auth_failure(listener, reason);
    }

    pub fn authorization_denied(&self, listener: &str) {
        self.authorization_denials
            .get_or_create(&RefusalLabel { listener: listener.to_owned(), reason: "denied".to_owned() })
            .inc();
    }

    pub fn observe_request<T, E: AsCode>(
        family: &Family<ResultLabel, Counter>,
        latency: &Histogram,
        elapsed: Duration,
        r: &Result<T, E>,
    ) {
        let result = match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code().to_owned(),
        };
        family.get_or_create(&ResultLabel { result }).inc();
        latency.observe(elapsed.as_secs_f64());
    }

    /// The observer the segment logs call after each group-commit sync.
    pub fn sync_observer(self: &Arc<Self>) -> eddy_raft::log::store::SyncObserver {
        let m = self.clone();
        Arc::new(move |d: Duration| m.fsync_latency.observe(d.as_secs_f64()))
    }

    /// The observer the metadata state machine calls after each applied batch.
    pub fn meta_apply_observer(self: &Arc<Self>) -> crate::meta::ApplyObserver {
        let m = self.clone();
        Arc::new(move |d: Duration| m.meta_apply_latency.observe(d.as_secs_f64()))
    }

    /// Adds the metrics to a registry (for one scrape).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "eddy_produce_requests",
            "Produce requests handled, by result",
            self.produce_requests.clone(),
        );
        reg.register(
            "eddy_produce_records",
            "Records accepted by produce requests",
            self.produce_records.clone(),
        );
        reg.register(
            "eddy_produce_entries",
            "Raft entries proposed for produce requests (requests queued behind a busy partition share one)",
            self.produce_entries.clone(),
        );
        reg.register(
            "eddy_produce_entry_batches",
            "Produce batches carried by those entries (more than the entries when batches were coalesced)",
            self.produce_entry_batches.clone(),
        );
        reg.register_with_unit(
            "eddy_produce_latency",
            "Produce request latency on the leader (until committed on a quorum)",
            prometheus_client::registry::Unit::Seconds,
            self.produce_latency.clone(),
        );
        reg.register("eddy_fetch_requests", "Fetch requests handled, by result", self.fetch_requests.clone());
        reg.register("eddy_fetch_records", "Records returned by fetches", self.fetch_records.clone());
        reg.register("eddy_kafka_requests", "Kafka requests answered, by API", self.kafka_requests.clone());
        reg.register(
            "eddy_kafka_fetch_records",
            "Records this node served to Kafka fetches",
            self.kafka_fetch_records.clone(),
        );
        reg.register(
            "eddy_kafka_produce_records",
            "Records accepted from Kafka producers",
            self.kafka_produce_records.clone(),
        );
        reg.register(
            "eddy_kafka_read_replica_redirects",
            "Kafka fetches answered with a preferred read replica in the client's rack (KIP-392)",
            self.kafka_read_replica_redirects.clone(),
        );
        reg.register_with_unit(
            "eddy_fetch_latency",
            "Fetch request latency (including long-poll waits)",
            prometheus_client::registry::Unit::Seconds,
            self.fetch_latency.clone(),
        );
        reg.register_with_unit(
            "eddy_raft_commit_latency",
            "Time from proposing a batch to its commit and apply on the leader",
            prometheus_client::registry::Unit::Seconds,
            self.commit_latency.clone(),
        );
        reg.register_with_unit(
            "eddy_fsync_latency",
            "Duration of each group-commit fdatasync of a log",
            prometheus_client::registry::Unit::Seconds,
            self.fsync_latency.clone(),
        );
        reg.register(
            "eddy_auth_failures",
            "Authentication failures and refused connections, by listener and reason",
            self.auth_failures.clone(),
        );
        reg.register(
            "eddy_authorization_denials",
            "Requests refused because no ACL allows them, by listener",
            self.authorization_denials.clone(),
        );
        reg.register_with_unit(
            "eddy_meta_apply_latency",
            "Duration of each batch the metadata state machine applies (apply, persist, publish)",
            prometheus_client::registry::Unit::Seconds,
            self.meta_apply_latency.clone(),
        );
    }
}

/// Errors that carry a stable code for the `result` label.
pub trait AsCode {
    fn code(&self) -> &'static str;
}

impl AsCode for crate::error::BrokerError {
    fn code(&self) -> &'static str {
        crate::error::BrokerError::code(self)
    }
}
