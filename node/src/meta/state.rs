//! The metadata group's replicated state and the deterministic rules that change it.
//!
//! Everything here runs inside the state machine's `apply`, on every replica, so it must be a
//! pure function of the state and the command: no clock, no randomness, ordered maps only.

use std::collections::BTreeMap;

use eddy_raft::GroupId;
use eddy_raft::Membership;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use serde::Deserialize;
use serde::Serialize;

use super::command::MetaCommand;
use super::command::MetaError;
use super::command::MetaReply;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Active,
}

impl NodeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Active => "active",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addr: NodeAddr,
    pub state: NodeState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub group_id: GroupId,
    /// Current replicas; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// The replicas the group was created with. Only these may initialize the group's Raft
    /// membership; a replica added later joins as a learner of the running group.
    pub initial_replicas: Vec<NodeId>,
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
}

/// The metadata group's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub topics: BTreeMap<String, TopicRecord>,
    /// The next partition group id; group 0 is the metadata group itself.
    pub next_group_id: GroupId,
    pub next_producer_id: u64,
}

impl Default for MetaState {
    fn default() -> Self {
        Self {
            nodes: BTreeMap::new(),
            topics: BTreeMap::new(),
            next_group_id: 1,
            next_producer_id: 1,
        }
    }
}

impl MetaState {
    /// Keeps the node table in line with the metadata group's membership: every member is a
    /// node of the cluster, with the addresses it registered.
    pub fn apply_membership(&mut self, membership: &Membership) {
        for (id, addr) in membership.nodes() {
            self.nodes
                .entry(*id)
                .and_modify(|n| n.addr = addr.clone())
                .or_insert_with(|| NodeRecord {
                    addr: addr.clone(),
                    state: NodeState::Active,
                });
        }
    }

    pub fn apply(&mut self, cmd: MetaCommand) -> MetaReply {
        match cmd {
            MetaCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                config,
            } => match self.create_topic(name, partitions, replication_factor, config) {
                Ok(t) => MetaReply::TopicCreated(t),
                Err(e) => MetaReply::Error(e),
            },
            MetaCommand::AllocateProducerId => {
                let id = self.next_producer_id;
                self.next_producer_id += 1;
                MetaReply::ProducerId(id)
            }
        }
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
            return Err(MetaError::Invalid(
                "partitions and replication_factor must be at least 1".into(),
            ));
        }
        let placement = self.place(partitions, replication_factor)?;
        let partitions = placement
            .into_iter()
            .map(|replicas| {
                let group_id = self.next_group_id;
                self.next_group_id += 1;
                PartitionRecord {
                    group_id,
                    initial_replicas: replicas.clone(),
                    replicas,
                }
            })
            .collect();
        let topic = TopicRecord {
            name: name.clone(),
            partitions,
            replication_factor,
            config,
        };
        self.topics.insert(name, topic.clone());
        Ok(topic)
    }

    fn active_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Chooses replicas for `n_partitions` new partitions: each partition's preferred leader is
    /// the node leading the fewest partitions so far, its followers the nodes holding the fewest
    /// replicas; ties go to the lower node id. Over a topic this spreads leaders and replicas
    /// evenly, also across topics.
    fn place(&self, n_partitions: u32, rf: u32) -> Result<Vec<Vec<NodeId>>, MetaError> {
        let nodes = self.active_nodes();
        if rf as usize > nodes.len() {
            return Err(MetaError::NotEnoughNodes {
                replication_factor: rf,
                nodes: nodes.len() as u32,
            });
        }
        let mut leaders: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (*n, 0)).collect();
        let mut replicas: BTreeMap<NodeId, u64> = leaders.clone();
        for t in self.topics.values() {
            for p in &t.partitions {
                if let Some(l) = p.replicas.first()
                    && let Some(c) = leaders.get_mut(l)
                {
                    *c += 1;
                }
                for r in &p.replicas {
                    if let Some(c) = replicas.get_mut(r) {
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
                .map(|(i, p)| (t, i as u32, p))
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
            .map(|i| {
                (
                    i,
                    NodeAddr {
                        raft_addr: format!("r{i}"),
                        client_addr: format!("c{i}"),
                    },
                )
            })
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
    fn placement_spreads_leaders_and_replicas() {
        let mut s = cluster(3);
        let MetaReply::TopicCreated(t) = create(&mut s, "orders", 3, 3) else {
            panic!("created")
        };
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
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 1),
            "{counts:?}"
        );
        let mut replicas: BTreeMap<NodeId, usize> = BTreeMap::new();
        for t in s.topics.values() {
            for p in &t.partitions {
                for r in &p.replicas {
                    *replicas.entry(*r).or_default() += 1;
                }
            }
        }
        let (min, max) = (replicas.values().min().copied(), replicas.values().max().copied());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 1),
            "{replicas:?}"
        );
    }

    #[test]
    fn refusals_and_ids() {
        let mut s = cluster(3);
        assert_eq!(
            create(&mut s, "t", 1, 4),
            MetaReply::Error(MetaError::NotEnoughNodes {
                replication_factor: 4,
                nodes: 3
            })
        );
        assert!(matches!(create(&mut s, "t", 2, 1), MetaReply::TopicCreated(_)));
        assert_eq!(
            create(&mut s, "t", 1, 1),
            MetaReply::Error(MetaError::TopicExists("t".into()))
        );
        let groups: Vec<_> = s.topics["t"].partitions.iter().map(|p| p.group_id).collect();
        assert_eq!(groups, vec![1, 2]);
        assert_eq!(s.apply(MetaCommand::AllocateProducerId), MetaReply::ProducerId(1));
        assert_eq!(s.apply(MetaCommand::AllocateProducerId), MetaReply::ProducerId(2));
        assert_eq!(
            s.partition_of(2).map(|(t, i, _)| (t.name.as_str(), i)),
            Some(("t", 1))
        );
    }
}
