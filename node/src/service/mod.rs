//! The node's services, whatever protocol a client speaks: producing, fetching and looking up
//! offsets ([`data`]), topics and cluster metadata ([`topics`]), and consumer groups ([`groups`]). They take and return
//! Eddy's own types and fail with [`BrokerError`]; the adapters in `crate::api` convert wire
//! types at the boundary and validate wire-level fields.

pub mod data;
pub mod groups;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use eddy_proto::v1 as pb;
use eddy_raft::NodeId;
use eddy_raft::transport::Peers;

use crate::control::manager::Replicas;
use crate::env::Clock;
use crate::error::BrokerError;
use crate::limits::Limits;
use crate::meta::MetaHandle;
use crate::meta::state::PartitionRecord;
use crate::meta::state::TopicRecord;
use crate::metrics::NodeMetrics;
use crate::partition::handle::PartitionHandle;

/// How long a metadata write (a topic created, a producer id, a group change) may take.
pub const META_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the services share.
pub struct BrokerState {
    pub me: NodeId,
    pub limits: Limits,
    pub meta: MetaHandle,
    /// The partition replicas this node hosts.
    pub replicas: Arc<Replicas>,
    pub clock: Arc<dyn Clock>,
    /// Channels to other nodes' client ports (for cluster-wide status).
    pub client_peers: Arc<Peers>,
    pub metrics: Arc<NodeMetrics>,
    pub liveness: Arc<eddy_raft::liveness::Liveness>,
    /// Users, ACL bindings and superusers, for the listeners' authentication and authorization.
    pub security: Arc<crate::security::Security>,
    /// This node's TLS certificates, when `[tls]` is configured (for listeners started outside
    /// `node::start`: Kafka and HTTP).
    pub tls: Option<crate::security::tls::TlsMaterial>,
    /// The node's configuration, as it started.
    pub config: Arc<crate::config::NodeConfig>,
    /// The data disk's space: writes are refused while it is below the reserve.
    pub disk: Arc<crate::disk::DiskSpace>,
    /// The last cluster status gathered, and when (see [`BrokerState::cluster_status`]).
    pub status_cache: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<crate::status::ClusterStatus>)>>,
    /// This node's own report, for `recent` asks (see `BrokerState::recent_local_status`).
    pub local_status_cache: std::sync::Mutex<Option<(tokio::time::Instant, Arc<pb::NodeStatusResponse>)>>,
}

impl BrokerState {
    /// A topic and one of its partitions, or the error naming which does not exist.
    pub fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Arc<TopicRecord>, PartitionRecord), BrokerError> {
        let t = self.topic(topic)?;
        let i = partition_index(&t, partition)?;
        let p = t.partitions[i].clone();
        Ok((t, p))
    }

    /// A topic's record, shared with the metadata view (not copied: a topic may have thousands
    /// of partitions, and this runs for every produce).
    pub fn topic(&self, name: &str) -> Result<Arc<TopicRecord>, BrokerError> {
        self.meta
            .view()
            .state
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// Waits (up to `timeout`) until this node's metadata view satisfies `done`: after a write
    /// that the metadata leader applied, so that the next request to this node sees it
    /// (read-your-writes for a client that stays on this node). Whether it got there.
    pub async fn await_view(&self, timeout: Duration, done: impl Fn(&crate::meta::MetaView) -> bool) -> bool {
        let mut rx = self.meta.subscribe();
        // Cancel-safe: waiting on a watch only observes values.
        tokio::time::timeout(timeout, rx.wait_for(|v| done(v))).await.is_ok_and(|r| r.is_ok())
    }

    /// This node's replica of a partition, for reading it.
    fn replica(&self, topic: &TopicRecord, partition: u32) -> Result<PartitionHandle, BrokerError> {
        let p = &topic.partitions[partition_index(topic, partition)?];
        self.replicas.get(p.group_id).ok_or_else(|| BrokerError::NotReplica {
            what: format!("{}/{partition}", topic.name),
            me: self.me,
            replicas: p.replicas.clone(),
        })
    }
}

pub(crate) fn partition_index(topic: &TopicRecord, p: u32) -> Result<usize, BrokerError> {
    if (p as usize) < topic.partitions.len() {
        Ok(p as usize)
    } else {
        Err(BrokerError::UnknownPartition {
            topic: topic.name.clone(),
            partition: p,
            count: topic.partitions.len() as u32,
        })
    }
}
