//! Consumer groups: joins, heartbeats, commits and resets go to the coordinator (the metadata
//! leader) through the metadata handle; reads answer from this node's replica of the metadata.

use std::collections::BTreeSet;

use super::BrokerState;
use super::META_WRITE_TIMEOUT;
use crate::error::BrokerError;
use crate::meta::MetaCommand;
use crate::meta::MetaReply;
use crate::meta::groups::Assignment;
use crate::meta::groups::Assignor;
use crate::meta::groups::GroupRecord;
use crate::meta::groups::TopicPartition;

/// A member's session timeout when it asks for none.
pub const SESSION_TIMEOUT_MS_DEFAULT: u32 = 10_000;

/// A partition of a group's view: what the group committed there, and how far behind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartition {
    pub tp: TopicPartition,
    pub committed: Option<u64>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// From the committed offset, or from the log start when nothing was committed.
    pub lag: u64,
}

/// A group as an operator sees it.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub record: GroupRecord,
    /// Every partition of a subscribed topic, and every partition with a committed offset.
    pub partitions: Vec<GroupPartition>,
}

/// `empty`, `rebalancing` or `stable`.
pub fn group_state(g: &GroupRecord) -> &'static str {
    if g.members.is_empty() {
        "empty"
    } else if g.rebalancing() {
        "rebalancing"
    } else {
        "stable"
    }
}

fn assignment(r: MetaReply) -> Result<Assignment, BrokerError> {
    match r {
        MetaReply::Assignment(a) => Ok(a),
        other => Err(BrokerError::Internal(format!("unexpected reply to a group request: {other:?}"))),
    }
}

impl BrokerState {
    /// Adds a member subscribed to `topics` (0 for the session timeout means the default).
    pub async fn join_group(
        &self,
        group: &str,
        topics: BTreeSet<String>,
        assignor: Assignor,
        session_timeout_ms: u32,
    ) -> Result<Assignment, BrokerError> {
        if topics.is_empty() {
            return Err(BrokerError::InvalidArgument("topics: subscribe to at least one topic".into()));
        }
        let session_timeout_ms =
            if session_timeout_ms == 0 { SESSION_TIMEOUT_MS_DEFAULT } else { session_timeout_ms };
        let cmd = MetaCommand::JoinGroup {
            group: group.to_owned(),
            topics: topics.into_iter().collect(),
            session_timeout_ms,
            assignor,
        };
        let a = assignment(self.meta.write(cmd, META_WRITE_TIMEOUT).await?)?;
        self.meta.liveness().touch(group, &a.member_id);
        Ok(a)
    }

    /// A member's heartbeat, reporting the partitions it owns; answers its assignment.
    pub async fn group_heartbeat(
        &self,
        group: String,
        member: String,
        generation: u64,
        owned: Vec<TopicPartition>,
    ) -> Result<Assignment, BrokerError> {
        assignment(self.meta.heartbeat(group, member, generation, owned, META_WRITE_TIMEOUT).await?)
    }

    pub async fn leave_group(&self, group: String, member: String) -> Result<(), BrokerError> {
        self.meta.write(MetaCommand::LeaveGroup { group, member }, META_WRITE_TIMEOUT).await?;
        Ok(())
    }

    /// Commits offsets, as a member (fenced if it no longer owns a partition) or, with `member`
    /// `None`, as an operator or a standalone consumer.
    pub async fn commit_offsets(
        &self,
        group: String,
        member: Option<String>,
        offsets: Vec<(TopicPartition, u64)>,
    ) -> Result<(), BrokerError> {
        if offsets.is_empty() {
            return Err(BrokerError::InvalidArgument("offsets: give at least one".into()));
        }
        self.meta.write(MetaCommand::CommitOffsets { group, member, offsets }, META_WRITE_TIMEOUT).await?;
        Ok(())
    }

    /// Sets a group's offsets (the group must have no members).
    pub async fn reset_offsets(
        &self,
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    ) -> Result<(), BrokerError> {
        if offsets.is_empty() {
            return Err(BrokerError::InvalidArgument("offsets: give at least one".into()));
        }
        self.meta.write(MetaCommand::ResetOffsets { group, offsets }, META_WRITE_TIMEOUT).await?;
        Ok(())
    }

    pub async fn delete_group(&self, group: String) -> Result<(), BrokerError> {
        self.meta.write(MetaCommand::DeleteGroup { group }, META_WRITE_TIMEOUT).await?;
        Ok(())
    }

    /// A group's committed offsets in `topics` (all when empty). A group that never committed
    /// has none: that is an empty answer, not an error. `linearizable` reads on the coordinator
    /// after every earlier commit.
    pub async fn committed_offsets(
        &self,
        group: &str,
        topics: &BTreeSet<String>,
        linearizable: bool,
    ) -> Result<Vec<(TopicPartition, u64)>, BrokerError> {
        let view = if linearizable {
            self.meta.linearizable_view(META_WRITE_TIMEOUT).await?
        } else {
            self.meta.view()
        };
        Ok(view
            .state
            .groups
            .get(group)
            .map(|g| {
                g.offsets
                    .iter()
                    .filter(|((t, _), _)| topics.is_empty() || topics.contains(t))
                    .map(|(tp, offset)| (tp.clone(), *offset))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Every group, by name.
    pub fn list_groups(&self) -> Vec<(String, std::sync::Arc<GroupRecord>)> {
        self.meta.view().state.groups.iter().map(|(n, g)| (n.clone(), g.clone())).collect()
    }

    /// A group with its members and, per partition, its commit, the high watermark and the lag
    /// (gathered afresh from every node, so a commit is never shown above the watermark).
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, BrokerError> {
        let view = self.meta.view();
        let g = view
            .state
            .groups
            .get(group)
            .map(|g| GroupRecord::clone(g))
            .ok_or_else(|| BrokerError::UnknownGroup(group.to_owned()))?;
        let mut tps: BTreeSet<TopicPartition> = g.offsets.keys().cloned().collect();
        for t in g.members.values().flat_map(|m| m.topics.iter()) {
            if let Some(rec) = view.state.topics.get(t) {
                tps.extend((0..rec.partitions.len() as u32).map(|p| (t.clone(), p)));
            }
        }
        let status = self.cluster_status().await;
        let partitions = tps
            .into_iter()
            .map(|tp| {
                let progress = view
                    .state
                    .topics
                    .get(&tp.0)
                    .and_then(|t| t.partitions.get(tp.1 as usize))
                    .and_then(|p| status.partitions.get(&p.group_id))
                    .cloned()
                    .unwrap_or_default();
                let committed = g.offsets.get(&tp).copied();
                GroupPartition {
                    lag: progress.hw.saturating_sub(committed.unwrap_or(progress.log_start)),
                    tp,
                    committed,
                    high_watermark: progress.hw,
                    log_start_offset: progress.log_start,
                }
            })
            .collect();
        Ok(GroupDescription { record: g, partitions })
    }
}
