//! Topics and cluster metadata: creating a topic, and what a client needs to find partition
//! leaders and replicas.

use std::collections::BTreeMap;
use std::sync::Arc;

use eddy_raft::NodeId;

use super::BrokerState;
use super::META_WRITE_TIMEOUT;
use crate::error::BrokerError;
use crate::limits;
use crate::meta::MetaCommand;
use crate::meta::MetaReply;
use crate::meta::MetaView;
use crate::meta::state::TopicRecord;
use crate::status::ClusterStatus;

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub config: BTreeMap<String, String>,
}

/// The cluster as a client sees it: members, and the asked topics with each partition's
/// leader, replicas and progress (`status`, gathered from every node, at most a moment old).
pub struct ClusterMetadata {
    pub view: Arc<MetaView>,
    /// The topics asked for (all when none were named), in name order.
    pub topics: Vec<Arc<TopicRecord>>,
    pub status: Arc<ClusterStatus>,
    pub metadata_leader: Option<NodeId>,
}

impl BrokerState {
    /// Creates a topic through the metadata group; its partitions are placed at once.
    pub async fn create_topic(&self, t: NewTopic) -> Result<TopicRecord, BrokerError> {
        limits::validate_topic_name("name", &t.name)?;
        if t.partitions == 0 || t.partitions > limits::PARTITIONS_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "partitions: {} is out of range; a topic has 1 to {} partitions",
                t.partitions,
                limits::PARTITIONS_MAX
            )));
        }
        if t.replication_factor == 0 || t.replication_factor > limits::REPLICATION_FACTOR_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "replication_factor: {} is out of range; it must be 1 to {}",
                t.replication_factor,
                limits::REPLICATION_FACTOR_MAX
            )));
        }
        limits::validate_topic_config(&t.config)?;
        let cmd = MetaCommand::CreateTopic {
            name: t.name,
            partitions: t.partitions,
            replication_factor: t.replication_factor,
            config: t.config,
        };
        match self.meta.write(cmd, META_WRITE_TIMEOUT).await? {
            MetaReply::TopicCreated(t) => Ok(t),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Deletes a topic and, once every replica has gone, its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        limits::validate_topic_name("name", name)?;
        self.meta.write(MetaCommand::DeleteTopic { name: name.to_owned() }, META_WRITE_TIMEOUT).await?;
        Ok(())
    }

    /// Sets topic configuration keys; returns the whole configuration after the change.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, BrokerError> {
        limits::validate_topic_name("name", name)?;
        if set.is_empty() {
            return Err(BrokerError::InvalidArgument("set: give at least one key=value".into()));
        }
        limits::validate_topic_config(&set)?;
        let cmd = MetaCommand::AlterTopicConfig { name: name.to_owned(), set };
        match self.meta.write(cmd, META_WRITE_TIMEOUT).await? {
            MetaReply::Topic(t) => Ok(t.config),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Adds `count` partitions to a topic; returns how many it has then.
    pub async fn add_partitions(&self, name: &str, count: u32) -> Result<u32, BrokerError> {
        limits::validate_topic_name("name", name)?;
        let existing = self.topic(name)?.partitions.len() as u32;
        if count == 0 || existing + count > limits::PARTITIONS_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "count: {count} is out of range; a topic has at most {} partitions and this one has {existing}",
                limits::PARTITIONS_MAX
            )));
        }
        match self
            .meta
            .write(MetaCommand::AddPartitions { name: name.to_owned(), count }, META_WRITE_TIMEOUT)
            .await?
        {
            MetaReply::Topic(t) => Ok(t.partitions.len() as u32),
            other => Err(BrokerError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The cluster's members and the named topics (every topic when `topics` is empty); an
    /// unknown topic is an error.
    pub async fn cluster_metadata(&self, topics: &[String]) -> Result<ClusterMetadata, BrokerError> {
        let view = self.meta.serving_view().await?;
        for name in topics {
            if !view.state.topics.contains_key(name) {
                return Err(BrokerError::UnknownTopic(name.clone()));
            }
        }
        let status = if view.state.topics.is_empty() {
            Arc::new(ClusterStatus::default())
        } else {
            self.recent_cluster_status().await
        };
        let chosen = view
            .state
            .topics
            .values()
            .filter(|t| topics.is_empty() || topics.contains(&t.name))
            .cloned()
            .collect();
        Ok(ClusterMetadata { topics: chosen, status, metadata_leader: self.meta.leader(), view })
    }
}
