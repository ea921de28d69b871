//! The metadata group's replicated state and the deterministic rules that change it.
//!
//! Everything here runs inside the state machine's `apply`, on every replica, so it must be a
//! pure function of the state and the command: no clock, no randomness, ordered maps only.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use eddy_raft::GroupId;
use eddy_raft::Membership;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use serde::Deserialize;
use serde::Serialize;

use super::command::MetaCommand;
use super::command::MetaError;
use super::command::MetaReply;
use super::groups::Assignor;
use super::groups::GroupRecord;
use super::groups::MemberRecord;
use super::groups::TopicPartition;
use crate::security::acl::AclBinding;
use crate::security::users::UserRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes replicas and leaderships.
    Active,
    /// Maintenance: keeps its replicas but gives up its leaderships and takes no new ones.
    Draining,
    /// Its replicas are being moved away; once it holds none it is removed.
    Decommissioning,
    /// No longer a member.
    Removed,
}

impl NodeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Decommissioning => "decommissioning",
            NodeState::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(NodeState::Active),
            "draining" => Some(NodeState::Draining),
            "decommissioning" => Some(NodeState::Decommissioning),
            "removed" => Some(NodeState::Removed),
            _ => None,
        }
    }

    /// Whether a node in this state may lead partitions.
    pub fn may_lead(&self) -> bool {
        *self == NodeState::Active
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addr: NodeAddr,
    pub state: NodeState,
    /// What the node registered about itself ([`MetaCommand::RegisterNode`]): its Kafka
    /// listener's address and its rack, both from its configuration.
    pub kafka_addr: Option<String>,
    pub rack: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub group_id: GroupId,
    /// Current replicas; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// The replicas the group was created with. Only these may initialize the group's Raft
    /// membership; a replica added later joins as a learner of the running group. Emptied once
    /// a move ends (completed or cancelled): a move may have deleted an initial replica's log,
    /// and a move back to exactly the initial replicas would otherwise look like a group that
    /// never moved, whose pristine replicas found it afresh: two groups under one id
    /// (simulator seed 9, with `move-back`).
    pub initial_replicas: Vec<NodeId>,
    /// While a move is in progress, the replica set the group is moving to. The group's leader
    /// changes its membership one step at a time until it matches, then reports the move done.
    pub target: Option<Vec<NodeId>>,
}

impl PartitionRecord {
    /// The replica set the group should converge to.
    pub fn desired(&self) -> &[NodeId] {
        self.target.as_deref().unwrap_or(&self.replicas)
    }

    /// Ends a move (completed or cancelled): no target, and no replica may found the group any
    /// more (see `initial_replicas`).
    pub fn end_move(&mut self) {
        self.target = None;
        self.initial_replicas.clear();
    }

    /// Every node that holds, or is about to hold, a replica.
    pub fn holders(&self) -> BTreeSet<NodeId> {
        self.replicas.iter().chain(self.target.iter().flatten()).copied().collect()
    }

    /// Whether `node` is among [`Self::holders`] (without building the set: this runs on every
    /// follower fetch).
    pub fn is_holder(&self, node: NodeId) -> bool {
        self.replicas.contains(&node) || self.target.as_ref().is_some_and(|t| t.contains(&node))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub partitions: Vec<PartitionRecord>,
    pub replication_factor: u32,
    pub config: BTreeMap<String, String>,
}

impl TopicRecord {
    pub fn max_event_bytes(&self) -> Option<u32> {
        self.config.get("max.event.bytes").and_then(|v| v.parse().ok())
    }

    /// `retention.ms`: records older than this may be deleted; `None` (or -1) keeps them.
    pub fn retention_ms(&self) -> Option<i64> {
        self.config.get("retention.ms").and_then(|v| v.parse().ok()).filter(|v: &i64| *v > 0)
    }

    /// `retention.bytes`: the most bytes of a partition's log kept; `None` (or -1) for no bound.
    pub fn retention_bytes(&self) -> Option<u64> {
        self.config
            .get("retention.bytes")
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|v| u64::try_from(v).ok())
    }

    /// `segment.bytes`: the size of this topic's log segments, if it sets one.
    pub fn segment_bytes(&self) -> Option<u64> {
        self.config.get("segment.bytes").and_then(|v| v.parse().ok())
    }

    /// `timestamp.type=log-append`: records get the leader's clock, whatever the producer says.
    pub fn log_append_time(&self) -> bool {
        self.config.get("timestamp.type").is_some_and(|v| v == "log-append")
    }
}

/// Topics by name. Each record is shared between the state machine and the views it published
/// (copy on write), so publishing a view after a consumer-group commit copies no partition.
pub type Topics = BTreeMap<String, Arc<TopicRecord>>;

/// The metadata group's state.
///
/// Topics and consumer groups sit behind `Arc`s and are changed through `Arc::make_mut`: a
/// command copies only the records it changes, never the whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub topics: Topics,
    /// The next partition group id; group 0 is the metadata group itself.
    pub next_group_id: GroupId,
    pub next_producer_id: u64,
    /// Consumer groups by name.
    pub groups: BTreeMap<String, Arc<GroupRecord>>,
    /// Member ids are never reused, which fences a member whose session expired.
    pub next_member_id: u64,
    /// Users with secret credentials, by name.
    pub users: BTreeMap<String, Arc<UserRecord>>,
    /// Every ACL binding (shared, so that cloning the state for each applied entry stays cheap).
    pub acls: Arc<BTreeSet<AclBinding>>,
    /// Byte-rate quotas by user (`*`: every user without its own).
    pub quotas: BTreeMap<String, crate::security::quota::UserQuota>,
}

impl Default for MetaState {
    fn default() -> Self {
        Self {
            nodes: BTreeMap::new(),
            topics: BTreeMap::new(),
            next_group_id: 1,
            next_producer_id: 1,
            groups: BTreeMap::new(),
            next_member_id: 1,
            users: BTreeMap::new(),
            acls: Arc::default(),
            quotas: BTreeMap::new(),
        }
    }
}

impl MetaState {
    /// Keeps the node table in line with the metadata group's membership: every member is a
    /// node of the cluster, with the addresses it registered.
    pub fn apply_membership(&mut self, membership: &Membership) {
        for (id, addr) in membership.nodes() {
            self.nodes.entry(*id).and_modify(|n| n.addr = addr.clone()).or_insert_with(|| NodeRecord {
                addr: addr.clone(),
                state: NodeState::Active,
                kafka_addr: None,
                rack: None,
            });
        }
    }

    pub fn apply(&mut self, cmd: MetaCommand) -> MetaReply {
        match cmd {
            MetaCommand::CreateTopic { name, partitions, replication_factor, config } => {
                match self.create_topic(name, partitions, replication_factor, config) {
                    Ok(t) => {
                        self.rebalance_groups();
                        MetaReply::TopicCreated(t)
                    }
                    Err(e) => MetaReply::Error(e),
                }
            }
            MetaCommand::AllocateProducerId => {
                let id = self.next_producer_id;
                self.next_producer_id += 1;
                MetaReply::ProducerId(id)
            }
            MetaCommand::DeleteTopic { name } => match self.topics.remove(&name) {
                Some(_) => {
                    for g in self.groups.values_mut() {
                        if g.offsets.keys().any(|(t, _)| *t == name) {
                            let g = Arc::make_mut(g);
                            g.offsets.retain(|(t, _), _| *t != name);
                            g.offset_metadata.retain(|(t, _), _| *t != name);
                        }
                    }
                    self.rebalance_groups();
                    MetaReply::Done
                }
                None => MetaReply::Error(MetaError::UnknownTopic(name)),
            },
            MetaCommand::AlterTopicConfig { name, set } => match self.topics.get_mut(&name) {
                Some(t) => {
                    let t = Arc::make_mut(t);
                    t.config.extend(set);
                    MetaReply::Topic(t.clone())
                }
                None => MetaReply::Error(MetaError::UnknownTopic(name)),
            },
            MetaCommand::AddPartitions { name, count } => {
                let reply = self.add_partitions(name, count).into();
                self.rebalance_groups();
                reply
            }
            MetaCommand::MovePartition { topic, partition, replicas } => {
                self.move_partition(&topic, partition, replicas).map(|()| MetaReply::Done).into()
            }
            MetaCommand::CompleteMove { group, replicas } => {
                let completes =
                    |p: &PartitionRecord| p.group_id == group && p.target.as_ref() == Some(&replicas);
                for t in self.topics.values_mut() {
                    if !t.partitions.iter().any(completes) {
                        continue;
                    }
                    for p in Arc::make_mut(t).partitions.iter_mut() {
                        if completes(p) {
                            p.replicas = replicas.clone();
                            p.end_move();
                        }
                    }
                }
                MetaReply::Done
            }
            MetaCommand::CancelMove { topic, partition } => {
                self.cancel_move(&topic, partition).map(|()| MetaReply::Done).into()
            }
            MetaCommand::SetNodeState { node, state } => self.set_node_state(node, state).into(),
            MetaCommand::RegisterNode { node, kafka_addr, rack } => match self.nodes.get_mut(&node) {
                Some(n) => {
                    n.kafka_addr = kafka_addr;
                    n.rack = rack;
                    MetaReply::Done
                }
                None => MetaReply::Error(MetaError::UnknownNode(node)),
            },
            MetaCommand::SetPreferredLeader { topic, partition, node } => {
                self.set_preferred_leader(&topic, partition, node).map(|()| MetaReply::Done).into()
            }
            MetaCommand::JoinGroup { group, topics, session_timeout_ms, assignor } => {
                self.join_group(group, topics, session_timeout_ms, assignor).into()
            }
            MetaCommand::GroupHeartbeat { group, member, generation, owned } => {
                let topics = &self.topics;
                self.groups
                    .get_mut(&group)
                    .ok_or_else(|| MetaError::UnknownGroup(group.clone()))
                    .and_then(|g| {
                        let g = Arc::make_mut(g);
                        // Partitions of deleted topics are not owned any more.
                        let owned = owned.into_iter().filter(|(t, _)| topics.contains_key(t)).collect();
                        g.heartbeat(&group, &member, generation, owned)
                    })
                    .map(MetaReply::Assignment)
                    .into()
            }
            MetaCommand::LeaveGroup { group, member } | MetaCommand::ExpireMember { group, member } => {
                let topics = &self.topics;
                match self.groups.get_mut(&group) {
                    Some(g) => {
                        if g.members.contains_key(&member) {
                            let g = Arc::make_mut(g);
                            g.members.remove(&member);
                            g.rebalance(topics, true);
                        }
                        MetaReply::Done
                    }
                    None => MetaReply::Done,
                }
            }
            MetaCommand::CommitOffsets { group, member, offsets } => {
                let offsets = offsets.into_iter().map(|(tp, o)| (tp, o, String::new())).collect();
                self.commit_offsets(group, member, offsets).map(|()| MetaReply::Done).into()
            }
            MetaCommand::CommitOffsetsWithMetadata { group, offsets } => {
                self.commit_offsets(group, None, offsets).map(|()| MetaReply::Done).into()
            }
            MetaCommand::PutUser { name, record, replace } => {
                if !replace && self.users.contains_key(&name) {
                    return MetaReply::Error(MetaError::Conflict(format!(
                        "user \"{name}\" already exists; delete it first, or replace its token"
                    )));
                }
                self.users.insert(name, Arc::new(record));
                MetaReply::Done
            }
            MetaCommand::DeleteUser { name } => MetaReply::Changed(self.users.remove(&name).is_some()),
            MetaCommand::AddAcl(b) => MetaReply::Changed(Arc::make_mut(&mut self.acls).insert(b)),
            MetaCommand::RemoveAcl(b) => MetaReply::Changed(Arc::make_mut(&mut self.acls).remove(&b)),
            MetaCommand::SetQuota { user, quota } => {
                if quota == crate::security::quota::UserQuota::default() {
                    self.quotas.remove(&user);
                } else {
                    self.quotas.insert(user, quota);
                }
                MetaReply::Done
            }
            MetaCommand::ResetOffsets { group, offsets } => {
                self.reset_offsets(group, offsets).map(|()| MetaReply::Done).into()
            }
            MetaCommand::DeleteGroup { group } => match self.groups.get(&group) {
                None => MetaReply::Error(MetaError::UnknownGroup(group)),
                Some(g) if !g.members.is_empty() => MetaReply::Error(MetaError::Conflict(format!(
                    "group \"{group}\" has {} active members; stop them first",
                    g.members.len()
                ))),
                Some(_) => {
                    self.groups.remove(&group);
                    MetaReply::Done
                }
            },
        }
    }

    /// Recomputes the targets of every group after the topics changed.
    fn rebalance_groups(&mut self) {
        for g in self.groups.values_mut() {
            Arc::make_mut(g).rebalance(&self.topics, false);
        }
    }

    fn join_group(
        &mut self,
        group: String,
        topics: Vec<String>,
        session_timeout_ms: u32,
        assignor: Assignor,
    ) -> Result<MetaReply, MetaError> {
        use super::groups::MEMBERS_PER_GROUP_MAX;
        use super::groups::SESSION_TIMEOUT_MS_MAX;
        use super::groups::SESSION_TIMEOUT_MS_MIN;
        if topics.is_empty() {
            return Err(MetaError::Invalid("topics: subscribe to at least one topic".into()));
        }
        if let Some(t) = topics.iter().find(|t| !self.topics.contains_key(*t)) {
            return Err(MetaError::UnknownTopic(t.clone()));
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&session_timeout_ms) {
            return Err(MetaError::Invalid(format!(
                "session_timeout_ms: {session_timeout_ms} is outside {SESSION_TIMEOUT_MS_MIN}..={SESSION_TIMEOUT_MS_MAX}"
            )));
        }
        let g = Arc::make_mut(
            self.groups.entry(group.clone()).or_insert_with(|| Arc::new(GroupRecord::new(assignor))),
        );
        if g.members.is_empty() {
            g.assignor = assignor;
        } else if g.assignor != assignor {
            return Err(MetaError::Conflict(format!(
                "group \"{group}\" uses the {} assignor; join with that one (or stop its members first)",
                g.assignor.as_str()
            )));
        }
        if g.members.len() >= MEMBERS_PER_GROUP_MAX {
            return Err(MetaError::Invalid(format!("group \"{group}\" has {MEMBERS_PER_GROUP_MAX} members")));
        }
        let id = format!("{group}-{}", self.next_member_id);
        self.next_member_id += 1;
        g.members.insert(
            id.clone(),
            Arc::new(MemberRecord {
                topics: topics.into_iter().collect(),
                session_timeout_ms,
                target: Default::default(),
                owned: Default::default(),
                synced_generation: 0,
            }),
        );
        g.rebalance(&self.topics, true);
        Ok(MetaReply::Assignment(g.assignment(&id).expect("just joined")))
    }

    fn check_offsets(&self, offsets: &[(TopicPartition, u64)]) -> Result<(), MetaError> {
        if offsets.is_empty() {
            return Err(MetaError::Invalid("offsets: give at least one".into()));
        }
        for ((t, p), _) in offsets {
            let topic = self.topics.get(t).ok_or_else(|| MetaError::UnknownTopic(t.clone()))?;
            if *p as usize >= topic.partitions.len() {
                return Err(MetaError::UnknownPartition {
                    topic: t.clone(),
                    partition: *p,
                    count: topic.partitions.len() as u32,
                });
            }
        }
        Ok(())
    }

    /// Commits `offsets`, each with its metadata string (empty for none).
    fn commit_offsets(
        &mut self,
        group: String,
        member: Option<String>,
        with_metadata: Vec<(TopicPartition, u64, String)>,
    ) -> Result<(), MetaError> {
        let offsets: Vec<(TopicPartition, u64)> =
            with_metadata.iter().map(|(tp, o, _)| (tp.clone(), *o)).collect();
        self.check_offsets(&offsets)?;
        match (self.groups.get(&group), &member) {
            (Some(g), _) => g.check_commit(&group, member.as_deref(), &offsets)?,
            (None, Some(_)) => return Err(MetaError::UnknownGroup(group)),
            (None, None) => {
                GroupRecord::new(Assignor::CooperativeSticky).check_commit(&group, None, &offsets)?
            }
        }
        // Copies this group's record if a published view still shares it: O(this group), not
        // O(the whole state).
        let g = self
            .groups
            .entry(group)
            .or_insert_with(|| Arc::new(GroupRecord::new(Assignor::CooperativeSticky)));
        let g = Arc::make_mut(g);
        g.offsets.extend(offsets);
        for (tp, _, metadata) in with_metadata {
            if metadata.is_empty() {
                g.offset_metadata.remove(&tp);
            } else {
                g.offset_metadata.insert(tp, metadata);
            }
        }
        Ok(())
    }

    fn reset_offsets(&mut self, group: String, offsets: Vec<(TopicPartition, u64)>) -> Result<(), MetaError> {
        self.check_offsets(&offsets)?;
        if let Some(g) = self.groups.get(&group)
            && !g.members.is_empty()
        {
            return Err(MetaError::Conflict(format!(
                "group \"{group}\" has {} active members; offsets can only be reset while the group is empty",
                g.members.len()
            )));
        }
        let g = self
            .groups
            .entry(group)
            .or_insert_with(|| Arc::new(GroupRecord::new(Assignor::CooperativeSticky)));
        let g = Arc::make_mut(g);
        for (tp, _) in &offsets {
            g.offset_metadata.remove(tp);
        }
        g.offsets.extend(offsets);
        Ok(())
    }

    fn partition_mut(&mut self, topic: &str, partition: u32) -> Result<&mut PartitionRecord, MetaError> {
        let t = self.topics.get_mut(topic).ok_or_else(|| MetaError::UnknownTopic(topic.to_owned()))?;
        let count = t.partitions.len() as u32;
        let t = Arc::make_mut(t);
        t.partitions.get_mut(partition as usize).ok_or_else(|| MetaError::UnknownPartition {
            topic: topic.to_owned(),
            partition,
            count,
        })
    }

    fn add_partitions(&mut self, name: String, count: u32) -> Result<MetaReply, MetaError> {
        let rf =
            self.topics.get(&name).ok_or_else(|| MetaError::UnknownTopic(name.clone()))?.replication_factor;
        if count == 0 {
            return Err(MetaError::Invalid("count: add at least one partition".into()));
        }
        let placement = self.place(count, rf)?;
        let groups: Vec<PartitionRecord> = placement
            .into_iter()
            .map(|replicas| {
                let group_id = self.next_group_id;
                self.next_group_id += 1;
                PartitionRecord { group_id, initial_replicas: replicas.clone(), replicas, target: None }
            })
            .collect();
        let t = Arc::make_mut(self.topics.get_mut(&name).expect("checked above"));
        t.partitions.extend(groups);
        Ok(MetaReply::Topic(t.clone()))
    }

    fn set_preferred_leader(&mut self, topic: &str, partition: u32, node: NodeId) -> Result<(), MetaError> {
        let p = self.partition_mut(topic, partition)?;
        if !p.desired().contains(&node) {
            return Err(MetaError::Invalid(format!(
                "to_node: node {node} holds no replica of {topic}/{partition} (replicas: {:?})",
                p.desired()
            )));
        }
        // Both the current set and a move's target: the preference survives the move.
        for set in std::iter::once(&mut p.replicas).chain(p.target.as_mut()) {
            if let Some(i) = set.iter().position(|n| *n == node) {
                set[..=i].rotate_right(1);
            }
        }
        Ok(())
    }

    fn move_partition(
        &mut self,
        topic: &str,
        partition: u32,
        replicas: Vec<NodeId>,
    ) -> Result<(), MetaError> {
        if replicas.is_empty() || replicas.len() > 5 {
            return Err(MetaError::Invalid("replicas: give 1 to 5 node ids".into()));
        }
        let distinct: BTreeSet<NodeId> = replicas.iter().copied().collect();
        if distinct.len() != replicas.len() {
            return Err(MetaError::Invalid(format!("replicas: {replicas:?} names a node twice")));
        }
        for r in &replicas {
            match self.nodes.get(r) {
                None => return Err(MetaError::UnknownNode(*r)),
                Some(n) if n.state != NodeState::Active && n.state != NodeState::Draining => {
                    return Err(MetaError::NowhereToGo(format!(
                        "replicas: node {r} is {}; a partition can only move to active nodes",
                        n.state.as_str()
                    )));
                }
                Some(_) => {}
            }
        }
        let p = self.partition_mut(topic, partition)?;
        if p.desired() == replicas.as_slice() {
            return Ok(());
        }
        if let Some(t) = &p.target {
            return Err(MetaError::Conflict(format!(
                "{topic}/{partition} is already moving to {t:?}; cancel that move first"
            )));
        }
        p.target = Some(replicas);
        Ok(())
    }

    fn cancel_move(&mut self, topic: &str, partition: u32) -> Result<(), MetaError> {
        let p = self.partition_mut(topic, partition)?;
        if p.target.is_none() {
            return Err(MetaError::Conflict(format!("{topic}/{partition} has no move in progress")));
        }
        p.end_move();
        Ok(())
    }

    /// Replicas (assigned or arriving) per node.
    pub fn replica_counts(&self) -> BTreeMap<NodeId, u32> {
        let mut counts: BTreeMap<NodeId, u32> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for t in self.topics.values() {
            for p in &t.partitions {
                for n in p.holders() {
                    *counts.entry(n).or_default() += 1;
                }
            }
        }
        counts
    }

    fn set_node_state(&mut self, node: NodeId, state: NodeState) -> Result<MetaReply, MetaError> {
        let current = self.nodes.get(&node).map(|n| n.state).ok_or(MetaError::UnknownNode(node))?;
        if current == NodeState::Removed {
            return Err(MetaError::Conflict(format!("node {node} has been removed")));
        }
        match state {
            NodeState::Active | NodeState::Draining => {
                if current == NodeState::Decommissioning {
                    // Cancelling a decommission: the moves away from this node stop.
                    let leaving = |p: &PartitionRecord| {
                        p.replicas.contains(&node) && p.target.as_ref().is_some_and(|t| !t.contains(&node))
                    };
                    for t in self.topics.values_mut() {
                        if !t.partitions.iter().any(leaving) {
                            continue;
                        }
                        for p in Arc::make_mut(t).partitions.iter_mut() {
                            if leaving(p) {
                                p.end_move();
                            }
                        }
                    }
                }
                self.set_state(node, state);
                Ok(MetaReply::Done)
            }
            NodeState::Decommissioning => {
                let moving = self.plan_decommission(node)?;
                self.set_state(node, state);
                Ok(MetaReply::Moving(moving))
            }
            NodeState::Removed => {
                if self.replica_counts().get(&node).copied().unwrap_or(0) > 0 {
                    return Err(MetaError::Conflict(format!("node {node} still holds replicas")));
                }
                self.set_state(node, state);
                Ok(MetaReply::Done)
            }
        }
    }

    fn set_state(&mut self, node: NodeId, state: NodeState) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.state = state;
        }
    }

    /// Gives every partition on `node` a target without it: the node is replaced by the active
    /// node holding the fewest replicas that the partition does not already use. Refuses (and
    /// changes nothing) if some partition has no such node.
    fn plan_decommission(&mut self, node: NodeId) -> Result<Vec<String>, MetaError> {
        let mut load = self.replica_counts();
        let candidates: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| **id != node && n.state == NodeState::Active)
            .map(|(id, _)| *id)
            .collect();
        let mut plan: Vec<(String, usize, Vec<NodeId>)> = Vec::new();
        for t in self.topics.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                if !p.desired().contains(&node) {
                    continue;
                }
                let used = p.holders();
                let Some(&to) =
                    candidates.iter().filter(|c| !used.contains(c)).min_by_key(|c| (load[c], **c))
                else {
                    return Err(MetaError::NowhereToGo(format!(
                        "cannot decommission node {node}: partition {}/{i} has {} replicas and no other active node can take one; add a node or lower the topic's replication factor first",
                        t.name,
                        p.desired().len()
                    )));
                };
                *load.entry(to).or_default() += 1;
                // A partition already moving keeps its target: replacing it would forget the
                // nodes that move may already have made voters, and they would count as holding
                // nothing (and could be removed) while the group still needs them. The
                // controller plans it once that move completes (`Controller::round`).
                if p.target.is_some() {
                    continue;
                }
                let new: Vec<NodeId> = p.desired().iter().map(|r| if *r == node { to } else { *r }).collect();
                plan.push((t.name.clone(), i, new));
            }
        }
        let mut moving = Vec::new();
        for (topic, i, new) in plan {
            let p = &mut Arc::make_mut(self.topics.get_mut(&topic).expect("planned from it")).partitions[i];
            // A replica set without the node, led by a node other than the one leaving.
            p.target = Some(new);
            moving.push(format!("{topic}/{i}"));
        }
        Ok(moving)
    }

    fn create_topic(
        &mut self,
        name: String,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
    ) -> Result<TopicRecord, MetaError> {
        if self.topics.contains_key(&name) {
            return Err(MetaError::TopicExists(name));
        }
        if partitions == 0 || replication_factor == 0 {
            return Err(MetaError::Invalid("partitions and replication_factor must be at least 1".into()));
        }
        let placement = self.place(partitions, replication_factor)?;
        let partitions = placement
            .into_iter()
            .map(|replicas| {
                let group_id = self.next_group_id;
                self.next_group_id += 1;
                PartitionRecord { group_id, initial_replicas: replicas.clone(), replicas, target: None }
            })
            .collect();
        let topic = TopicRecord { name: name.clone(), partitions, replication_factor, config };
        self.topics.insert(name, Arc::new(topic.clone()));
        Ok(topic)
    }

    fn active_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.state == NodeState::Active).map(|(id, _)| *id).collect()
    }

    /// Chooses replicas for `n_partitions` new partitions: each partition's preferred leader is
    /// the node leading the fewest partitions so far, its followers the nodes holding the fewest
    /// replicas; ties go to the lower node id. Over a topic this spreads leaders and replicas
    /// evenly, also across topics.
    fn place(&self, n_partitions: u32, rf: u32) -> Result<Vec<Vec<NodeId>>, MetaError> {
        let nodes = self.active_nodes();
        if rf as usize > nodes.len() {
            return Err(MetaError::NotEnoughNodes { replication_factor: rf, nodes: nodes.len() as u32 });
        }
        let mut leaders: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (*n, 0)).collect();
        let mut replicas: BTreeMap<NodeId, u64> = leaders.clone();
        for t in self.topics.values() {
            for p in &t.partitions {
                if let Some(l) = p.desired().first()
                    && let Some(c) = leaders.get_mut(l)
                {
                    *c += 1;
                }
                for r in p.holders() {
                    if let Some(c) = replicas.get_mut(&r) {
                        *c += 1;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(n_partitions as usize);
        for _ in 0..n_partitions {
            let leader = *nodes
                .iter()
                .min_by_key(|n| (leaders[*n], replicas[*n], **n))
                .expect("rf >= 1 implies at least one node");
            let mut chosen = vec![leader];
            let mut others: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != leader).collect();
            others.sort_by_key(|n| (replicas[n], leaders[n], *n));
            chosen.extend(others.into_iter().take(rf as usize - 1));
            *leaders.get_mut(&leader).expect("known node") += 1;
            for r in &chosen {
                *replicas.get_mut(r).expect("known node") += 1;
            }
            out.push(chosen);
        }
        Ok(out)
    }

    /// The topic and partition of a group, if it is a partition group.
    pub fn partition_of(&self, group: GroupId) -> Option<(&TopicRecord, u32, &PartitionRecord)> {
        self.topics.values().find_map(|t| {
            t.partitions
                .iter()
                .enumerate()
                .find(|(_, p)| p.group_id == group)
                .map(|(i, p)| (&**t, i as u32, p))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn cluster(n: u64) -> MetaState {
        let mut s = MetaState::default();
        let nodes: BTreeMap<NodeId, NodeAddr> = (1..=n)
            .map(|i| (i, NodeAddr { raft_addr: format!("r{i}"), client_addr: format!("c{i}") }))
            .collect();
        let m =
            Membership::new(vec![nodes.keys().copied().collect::<BTreeSet<_>>()], nodes).expect("membership");
        s.apply_membership(&m);
        s
    }

    fn create(s: &mut MetaState, name: &str, partitions: u32, rf: u32) -> MetaReply {
        s.apply(MetaCommand::CreateTopic {
            name: name.into(),
            partitions,
            replication_factor: rf,
            config: BTreeMap::new(),
        })
    }

    fn leader_counts(s: &MetaState) -> BTreeMap<NodeId, usize> {
        let mut c = BTreeMap::new();
        for t in s.topics.values() {
            for p in &t.partitions {
                *c.entry(p.replicas[0]).or_default() += 1;
            }
        }
        c
    }

    #[test]
    fn is_holder_agrees_with_holders() {
        let record = |replicas: Vec<NodeId>, target: Option<Vec<NodeId>>| PartitionRecord {
            group_id: 1,
            replicas,
            initial_replicas: Vec::new(),
            target,
        };
        for p in [
            record(vec![1, 2, 3], None),
            record(vec![1, 2, 3], Some(vec![2, 3, 4])),
            record(vec![1, 2, 3, 4], Some(vec![4, 5, 6])),
        ] {
            for n in 0..=7 {
                assert_eq!(p.is_holder(n), p.holders().contains(&n), "node {n} of {p:?}");
            }
        }
        assert!(record(vec![1, 2, 3], Some(vec![2, 3, 4])).is_holder(4), "a move's new replica holds");
        assert!(!record(vec![1, 2, 3], None).is_holder(4));
    }

    #[test]
    fn placement_spreads_leaders_and_replicas() {
        let mut s = cluster(3);
        let MetaReply::TopicCreated(t) = create(&mut s, "orders", 3, 3) else { panic!("created") };
        let leaders: Vec<_> = t.partitions.iter().map(|p| p.replicas[0]).collect();
        assert_eq!(leaders, vec![1, 2, 3]);
        for p in &t.partitions {
            let set: BTreeSet<_> = p.replicas.iter().collect();
            assert_eq!(set.len(), 3, "distinct replicas: {:?}", p.replicas);
        }
        let mut s = cluster(5);
        create(&mut s, "a", 7, 3);
        create(&mut s, "b", 6, 2);
        let counts = leader_counts(&s);
        let (min, max) = (counts.values().min().copied(), counts.values().max().copied());
        assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{counts:?}");
        let mut replicas: BTreeMap<NodeId, usize> = BTreeMap::new();
        for t in s.topics.values() {
            for p in &t.partitions {
                for r in &p.replicas {
                    *replicas.entry(*r).or_default() += 1;
                }
            }
        }
        let (min, max) = (replicas.values().min().copied(), replicas.values().max().copied());
        assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{replicas:?}");
    }

    #[test]
    fn refusals_and_ids() {
        let mut s = cluster(3);
        assert_eq!(
            create(&mut s, "t", 1, 4),
            MetaReply::Error(MetaError::NotEnoughNodes { replication_factor: 4, nodes: 3 })
        );
        assert!(matches!(create(&mut s, "t", 2, 1), MetaReply::TopicCreated(_)));
        assert_eq!(create(&mut s, "t", 1, 1), MetaReply::Error(MetaError::TopicExists("t".into())));
        let groups: Vec<_> = s.topics["t"].partitions.iter().map(|p| p.group_id).collect();
        assert_eq!(groups, vec![1, 2]);
        assert_eq!(s.apply(MetaCommand::AllocateProducerId), MetaReply::ProducerId(1));
        assert_eq!(s.apply(MetaCommand::AllocateProducerId), MetaReply::ProducerId(2));
        assert_eq!(s.partition_of(2).map(|(t, i, _)| (t.name.as_str(), i)), Some(("t", 1)));
    }

    #[test]
    fn decommission_moves_every_replica_or_refuses_at_once() {
        let mut s = cluster(3);
        create(&mut s, "orders", 3, 3);
        let before = s.clone();
        let r = s.apply(MetaCommand::SetNodeState { node: 2, state: NodeState::Decommissioning });
        assert!(
            matches!(r, MetaReply::Error(MetaError::NowhereToGo(ref m)) if m.contains("add a node")),
            "{r:?}"
        );
        assert_eq!(s, before, "a refused decommission changes nothing");

        let mut s = cluster(4);
        create(&mut s, "orders", 4, 3);
        let holding = s.topics["orders"].partitions.iter().filter(|p| p.replicas.contains(&1)).count();
        assert!(holding > 0);
        let r = s.apply(MetaCommand::SetNodeState { node: 1, state: NodeState::Decommissioning });
        let MetaReply::Moving(moving) = r else { panic!("decommission planned: {r:?}") };
        assert_eq!(moving.len(), holding, "every partition on node 1 moves");
        for p in &s.topics["orders"].partitions {
            match &p.target {
                Some(target) => {
                    assert!(p.replicas.contains(&1) && !target.contains(&1), "{target:?}");
                    assert_eq!(target.len(), 3);
                }
                None => assert!(!p.replicas.contains(&1)),
            }
        }
        assert_eq!(s.nodes[&1].state, NodeState::Decommissioning);
        // New topics avoid the node.
        let MetaReply::TopicCreated(t) = create(&mut s, "more", 2, 3) else { panic!("created") };
        assert!(t.partitions.iter().all(|p| !p.replicas.contains(&1)));
        // Moves complete as the leaders report them, and then the node can be removed.
        let groups: Vec<_> = s.topics["orders"]
            .partitions
            .iter()
            .filter_map(|p| p.target.clone().map(|t| (p.group_id, t)))
            .collect();
        let removed = MetaCommand::SetNodeState { node: 1, state: NodeState::Removed };
        assert!(matches!(s.apply(removed.clone()), MetaReply::Error(_)), "it still holds replicas");
        for (group, replicas) in groups {
            s.apply(MetaCommand::CompleteMove { group, replicas });
        }
        assert_eq!(s.replica_counts()[&1], 0);
        assert_eq!(s.apply(removed), MetaReply::Done);
    }

    /// A decommission during a move leaves that move's target alone: the nodes it added may
    /// already be voters, and replacing the target made them count as holding nothing, so they
    /// were removed (and switched off) while the group still needed them (simulator seed 43).
    /// The partition is planned away once the move completes, by deciding again.
    #[test]
    fn a_decommission_never_replaces_the_target_of_a_move_under_way() {
        let mut s = cluster(6);
        create(&mut s, "t", 1, 3);
        let before = s.topics["t"].partitions[0].replicas.clone();
        let outsiders: Vec<u64> = (1..=6).filter(|n| !before.contains(n)).collect();
        let target = vec![before[0], outsiders[0], outsiders[1]];
        let mv = MetaCommand::MovePartition { topic: "t".into(), partition: 0, replicas: target.clone() };
        assert_eq!(s.apply(mv), MetaReply::Done);
        let leaving = outsiders[0];
        let r = s.apply(MetaCommand::SetNodeState { node: leaving, state: NodeState::Decommissioning });
        assert!(matches!(r, MetaReply::Moving(_)), "{r:?}");
        assert_eq!(s.topics["t"].partitions[0].target.as_ref(), Some(&target), "the move keeps its target");
        assert!(s.replica_counts()[&leaving] > 0, "the node the move adds still holds a replica");
        let group = s.topics["t"].partitions[0].group_id;
        s.apply(MetaCommand::CompleteMove { group, replicas: target.clone() });
        // What the controller does next: decide again, which plans the remaining replica away.
        let r = s.apply(MetaCommand::SetNodeState { node: leaving, state: NodeState::Decommissioning });
        assert!(matches!(r, MetaReply::Moving(ref m) if m.len() == 1), "{r:?}");
        let next = s.topics["t"].partitions[0].target.clone().expect("planned");
        assert!(!next.contains(&leaving) && next.len() == 3, "{next:?}");
    }

    #[test]
    fn moves_validate_complete_and_cancel() {
        let mut s = cluster(4);
        create(&mut s, "t", 1, 3);
        let mv =
            |replicas: Vec<u64>| MetaCommand::MovePartition { topic: "t".into(), partition: 0, replicas };
        assert!(matches!(s.apply(mv(vec![2, 2, 3])), MetaReply::Error(MetaError::Invalid(_))));
        assert!(matches!(s.apply(mv(vec![2, 9, 3])), MetaReply::Error(MetaError::UnknownNode(9))));
        let bad_partition = MetaCommand::MovePartition { topic: "t".into(), partition: 5, replicas: vec![1] };
        assert!(matches!(s.apply(bad_partition), MetaReply::Error(MetaError::UnknownPartition { .. })));
        assert_eq!(s.apply(mv(vec![2, 3, 4])), MetaReply::Done);
        assert!(matches!(s.apply(mv(vec![1, 3, 4])), MetaReply::Error(MetaError::Conflict(_))));
        assert_eq!(s.apply(mv(vec![2, 3, 4])), MetaReply::Done, "repeating the same move is fine");
        let g = s.topics["t"].partitions[0].group_id;
        // A stale completion (for another replica set) changes nothing.
        s.apply(MetaCommand::CompleteMove { group: g, replicas: vec![1, 2, 3] });
        assert!(s.topics["t"].partitions[0].target.is_some());
        let cancel = MetaCommand::CancelMove { topic: "t".into(), partition: 0 };
        assert_eq!(s.apply(cancel.clone()), MetaReply::Done);
        assert!(s.topics["t"].partitions[0].target.is_none());
        assert!(matches!(s.apply(cancel), MetaReply::Error(_)));
        s.apply(mv(vec![2, 3, 4]));
        s.apply(MetaCommand::CompleteMove { group: g, replicas: vec![2, 3, 4] });
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.replicas.clone(), p.target.clone()), (vec![2, 3, 4], None));
        assert!(p.initial_replicas.is_empty(), "after a move, no replica may found the group");
    }

    #[test]
    fn a_partition_moved_back_to_its_initial_replicas_is_not_founded_again() {
        let mut s = cluster(5);
        create(&mut s, "t", 1, 3);
        let initial = s.topics["t"].partitions[0].replicas.clone();
        assert_eq!(s.topics["t"].partitions[0].initial_replicas, initial);
        let g = s.topics["t"].partitions[0].group_id;
        let away: Vec<u64> = (1..=5).filter(|n| !initial.contains(n)).chain([initial[0]]).collect();
        let mv =
            |replicas: Vec<u64>| MetaCommand::MovePartition { topic: "t".into(), partition: 0, replicas };
        assert_eq!(s.apply(mv(away.clone())), MetaReply::Done);
        s.apply(MetaCommand::CompleteMove { group: g, replicas: away });
        assert_eq!(s.apply(mv(initial.clone())), MetaReply::Done);
        s.apply(MetaCommand::CompleteMove { group: g, replicas: initial.clone() });
        let p = &s.topics["t"].partitions[0];
        assert_eq!((p.replicas.clone(), p.target.clone()), (initial, None), "back where it was created");
        assert!(p.initial_replicas.is_empty(), "but none of its replicas may found it again");
        // A cancelled move ends the same way.
        create(&mut s, "u", 1, 3);
        let first = s.topics["u"].partitions[0].replicas.clone();
        let other: Vec<u64> = (1..=5).filter(|n| !first.contains(n)).chain([first[0]]).collect();
        let mv_u = MetaCommand::MovePartition { topic: "u".into(), partition: 0, replicas: other };
        assert_eq!(s.apply(mv_u), MetaReply::Done);
        assert_eq!(s.apply(MetaCommand::CancelMove { topic: "u".into(), partition: 0 }), MetaReply::Done);
        assert!(s.topics["u"].partitions[0].initial_replicas.is_empty());
    }

    #[test]
    fn preferred_leader_moves_to_the_front_of_every_replica_set() {
        let mut s = cluster(4);
        create(&mut s, "t", 1, 3);
        let prefer = |node| MetaCommand::SetPreferredLeader { topic: "t".into(), partition: 0, node };
        let before = s.topics["t"].partitions[0].replicas.clone();
        let last = before[2];
        assert_eq!(s.apply(prefer(last)), MetaReply::Done);
        let after = &s.topics["t"].partitions[0].replicas;
        assert_eq!(after, &vec![last, before[0], before[1]], "the others keep their order");
        let outsider = (1..=4).find(|n| !before.contains(n)).unwrap();
        assert!(matches!(s.apply(prefer(outsider)), MetaReply::Error(MetaError::Invalid(_))));
        let target = vec![before[1], before[0], outsider];
        let mv = MetaCommand::MovePartition { topic: "t".into(), partition: 0, replicas: target };
        assert_eq!(s.apply(mv), MetaReply::Done);
        assert_eq!(s.apply(prefer(outsider)), MetaReply::Done, "a move's new replica may be preferred");
        assert_eq!(s.topics["t"].partitions[0].desired()[0], outsider);
    }

    #[test]
    fn topics_can_be_deleted_altered_and_grown() {
        let mut s = cluster(3);
        create(&mut s, "t", 2, 3);
        let set = [("max.event.bytes".to_string(), "2048".to_string())].into();
        let MetaReply::Topic(t) = s.apply(MetaCommand::AlterTopicConfig { name: "t".into(), set }) else {
            panic!()
        };
        assert_eq!(t.max_event_bytes(), Some(2048));
        let MetaReply::Topic(t) = s.apply(MetaCommand::AddPartitions { name: "t".into(), count: 3 }) else {
            panic!()
        };
        assert_eq!(t.partitions.len(), 5);
        let groups: std::collections::BTreeSet<_> = t.partitions.iter().map(|p| p.group_id).collect();
        assert_eq!(groups.len(), 5, "new partitions get new groups");
        assert_eq!(s.apply(MetaCommand::DeleteTopic { name: "t".into() }), MetaReply::Done);
        assert!(matches!(
            s.apply(MetaCommand::DeleteTopic { name: "t".into() }),
            MetaReply::Error(MetaError::UnknownTopic(_))
        ));
    }

    #[test]
    fn a_command_copies_only_the_records_it_changes() {
        let mut s = cluster(3);
        create(&mut s, "a", 100, 3);
        create(&mut s, "b", 10, 3);
        for (g, owner) in [("g1", None), ("g2", None)] {
            let offsets = vec![(("a".to_string(), 0), 5)];
            assert_eq!(
                s.apply(MetaCommand::CommitOffsets { group: g.into(), member: owner, offsets }),
                MetaReply::Done
            );
        }
        // What a published view holds.
        let published = s.clone();
        let commit = |s: &mut MetaState, o| {
            let offsets = vec![(("a".to_string(), 1), o)];
            s.apply(MetaCommand::CommitOffsets { group: "g1".into(), member: None, offsets })
        };
        assert_eq!(commit(&mut s, 7), MetaReply::Done);
        assert!(
            s.topics.iter().all(|(n, t)| Arc::ptr_eq(t, &published.topics[n])),
            "a commit copies no topic"
        );
        assert!(Arc::ptr_eq(&s.groups["g2"], &published.groups["g2"]), "nor another group");
        assert!(!Arc::ptr_eq(&s.groups["g1"], &published.groups["g1"]));
        assert_eq!(
            published.groups["g1"].offsets.get(&("a".to_string(), 1)),
            None,
            "the published view is unchanged"
        );
        assert_eq!(s.groups["g1"].offsets[&("a".to_string(), 1)], 7);
        // A refused commit changes nothing at all.
        let before = s.clone();
        assert!(matches!(commit(&mut s, 6), MetaReply::Error(MetaError::Invalid(_))));
        assert!(Arc::ptr_eq(&s.groups["g1"], &before.groups["g1"]));
        // Changing one topic copies that topic only.
        let set = [("retention.ms".to_string(), "1000".to_string())].into();
        assert!(matches!(
            s.apply(MetaCommand::AlterTopicConfig { name: "b".into(), set }),
            MetaReply::Topic(_)
        ));
        assert!(Arc::ptr_eq(&s.topics["a"], &published.topics["a"]));
        assert!(!Arc::ptr_eq(&s.topics["b"], &published.topics["b"]));
    }

    #[test]
    fn an_offset_keeps_the_metadata_committed_with_it_until_the_next_commit_or_reset() {
        let mut s = cluster(3);
        create(&mut s, "a", 2, 3);
        let tp = |p| ("a".to_string(), p);
        let with = |offsets: Vec<(TopicPartition, u64, &str)>| MetaCommand::CommitOffsetsWithMetadata {
            group: "g".into(),
            offsets: offsets.into_iter().map(|(tp, o, m)| (tp, o, m.to_owned())).collect(),
        };
        assert_eq!(s.apply(with(vec![(tp(0), 5, "checkpoint-5"), (tp(1), 3, "")])), MetaReply::Done);
        let g = &s.groups["g"];
        assert_eq!((g.offsets[&tp(0)], g.offsets[&tp(1)]), (5, 3));
        assert_eq!(g.offset_metadata.get(&tp(0)).map(String::as_str), Some("checkpoint-5"));
        assert_eq!(g.offset_metadata.get(&tp(1)), None, "empty metadata is none");
        // A commit without metadata (gRPC's) drops the old offset's.
        let plain = MetaCommand::CommitOffsets { group: "g".into(), member: None, offsets: vec![(tp(0), 6)] };
        assert_eq!(s.apply(plain), MetaReply::Done);
        assert_eq!(s.groups["g"].offset_metadata.get(&tp(0)), None);
        assert_eq!(s.apply(with(vec![(tp(0), 7, "m7"), (tp(1), 4, "m4")])), MetaReply::Done);
        let reset = MetaCommand::ResetOffsets { group: "g".into(), offsets: vec![(tp(1), 0)] };
        assert_eq!(s.apply(reset), MetaReply::Done);
        assert_eq!(s.groups["g"].offset_metadata.get(&tp(1)), None, "a reset drops it");
        assert_eq!(s.groups["g"].offset_metadata.get(&tp(0)).map(String::as_str), Some("m7"));
        // A refused commit (backwards) keeps the metadata too.
        assert!(matches!(s.apply(with(vec![(tp(0), 2, "older")])), MetaReply::Error(_)));
        assert_eq!(s.groups["g"].offset_metadata.get(&tp(0)).map(String::as_str), Some("m7"));
        assert_eq!(s.apply(MetaCommand::DeleteTopic { name: "a".into() }), MetaReply::Done);
        assert!(s.groups["g"].offset_metadata.is_empty(), "the topic's metadata goes with it");
    }
}
