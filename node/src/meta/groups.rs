//! Consumer groups: membership, partition assignment and committed offsets, kept in the
//! metadata group's state (the metadata leader is the group coordinator).
//!
//! Everything here runs inside the metadata state machine's `apply`, so it is a pure function of
//! the state and the command: ordered maps only, no clock. Liveness (session timeouts) is the
//! coordinator's business: it proposes [`crate::meta::MetaCommand::ExpireMember`] when a member
//! stops heartbeating.
//!
//! The protocol is coordinator-driven, like Kafka's KIP-848: the state machine computes each
//! member's *target* partitions whenever the membership or the topics change, and each heartbeat
//! answers with the partitions the member may consume now. A member reports the partitions it
//! *owns* (consumes); a change of that set is a replicated write, so a new coordinator knows it.
//!
//! - **Cooperative** (`cooperative-sticky`, the default): a partition moves only when its old
//!   owner has reported giving it up, so only the partitions that move pause; the sticky assignor
//!   keeps every partition where it is unless balance requires a move.
//! - **Eager** (`range`, `round-robin`): every new generation first revokes everything; no member
//!   gets partitions until all have reported owning none (Kafka's classic stop-the-world
//!   rebalance).
//!
//! Fencing: a commit is accepted only from a current member for a partition it owns or is
//! assigned, or, for an empty group, from an administrator. Member ids are never reused, so a
//! member whose session expired cannot commit again. Committed offsets never go backwards except
//! through an explicit reset.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;

use super::command::MetaError;
use super::state::Topics;

/// A (topic, partition) pair, ordered by topic then partition.
pub type TopicPartition = (String, u32);

/// The members of a group may hold at most this many committed offsets in total (a bound on the
/// metadata state's size).
pub const OFFSETS_PER_GROUP_MAX: usize = 10_000;
pub const MEMBERS_PER_GROUP_MAX: usize = 1_000;
pub const SESSION_TIMEOUT_MS_MIN: u32 = 1_000;
pub const SESSION_TIMEOUT_MS_MAX: u32 = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Assignor {
    CooperativeSticky,
    Range,
    RoundRobin,
}

impl Assignor {
    pub fn as_str(&self) -> &'static str {
        match self {
            Assignor::CooperativeSticky => "cooperative-sticky",
            Assignor::Range => "range",
            Assignor::RoundRobin => "round-robin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "cooperative-sticky" => Some(Assignor::CooperativeSticky),
            "range" => Some(Assignor::Range),
            "round-robin" | "roundrobin" => Some(Assignor::RoundRobin),
            _ => None,
        }
    }

    /// Whether a new generation revokes every partition before assigning any.
    pub fn is_eager(&self) -> bool {
        !matches!(self, Assignor::CooperativeSticky)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub topics: BTreeSet<String>,
    pub session_timeout_ms: u32,
    /// What the assignor wants this member to consume.
    pub target: BTreeSet<TopicPartition>,
    /// What the member last reported consuming.
    pub owned: BTreeSet<TopicPartition>,
    /// Eager groups: the last generation in which this member reported owning nothing.
    pub synced_generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub assignor: Assignor,
    /// Bumped whenever the membership or the target assignment changes.
    pub generation: u64,
    /// Shared with published views (copy on write): an offset commit copies none of them.
    pub members: BTreeMap<String, Arc<MemberRecord>>,
    /// Committed offsets: the next offset the group will consume in each partition.
    pub offsets: BTreeMap<TopicPartition, u64>,
    /// The metadata string a Kafka client committed with an offset, where it gave a non-empty
    /// one; it goes with that offset (a later commit without one, or a reset, drops it).
    pub offset_metadata: BTreeMap<TopicPartition, String>,
}

/// What a member may do now: the reply to a join or a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub member_id: String,
    pub generation: u64,
    /// The partitions the member may consume now.
    pub assigned: Vec<TopicPartition>,
    /// True while some member's partitions are still moving: members then heartbeat faster.
    pub rebalancing: bool,
    pub session_timeout_ms: u32,
}

impl GroupRecord {
    pub fn new(assignor: Assignor) -> Self {
        Self {
            assignor,
            generation: 0,
            members: BTreeMap::new(),
            offsets: BTreeMap::new(),
            offset_metadata: BTreeMap::new(),
        }
    }

    /// The partitions `member` may consume now.
    pub fn assigned(&self, member: &str) -> BTreeSet<TopicPartition> {
        let Some(m) = self.members.get(member) else {
            return BTreeSet::new();
        };
        if self.assignor.is_eager() {
            if self.members.values().all(|o| o.synced_generation == self.generation) {
                m.target.clone()
            } else {
                BTreeSet::new()
            }
        } else {
            // Targets are disjoint, so while no other member owns more than its own target, none
            // owns part of this one's: the whole target is free (a settled group; O(partitions)
            // comparisons instead of a set of every other member's partitions).
            if self.members.iter().all(|(id, o)| id == member || o.owned.is_subset(&o.target)) {
                return m.target.clone();
            }
            let held_elsewhere: BTreeSet<&TopicPartition> = self
                .members
                .iter()
                .filter(|(id, _)| id.as_str() != member)
                .flat_map(|(_, o)| o.owned.iter())
                .collect();
            m.target.iter().filter(|tp| !held_elsewhere.contains(tp)).cloned().collect()
        }
    }

    /// True while some member owns something other than its target, or is not yet assigned
    /// its whole target.
    pub fn rebalancing(&self) -> bool {
        if self.members.values().any(|m| m.owned != m.target) {
            return true;
        }
        // Every member owns exactly its target, and targets are disjoint: a cooperative member
        // is assigned its whole target; an eager one only once every member has synced.
        self.assignor.is_eager()
            && !self.members.values().all(|m| m.synced_generation == self.generation)
            && self.members.values().any(|m| !m.target.is_empty())
    }

    pub fn assignment(&self, member: &str) -> Option<Assignment> {
        let m = self.members.get(member)?;
        Some(Assignment {
            member_id: member.to_owned(),
            generation: self.generation,
            assigned: self.assigned(member).into_iter().collect(),
            rebalancing: self.rebalancing(),
            session_timeout_ms: m.session_timeout_ms,
        })
    }

    /// Records what a member reports owning (in the generation it knows).
    pub fn heartbeat(
        &mut self,
        group: &str,
        member: &str,
        generation: u64,
        owned: BTreeSet<TopicPartition>,
    ) -> Result<Assignment, MetaError> {
        let current = self.generation;
        let m = Arc::make_mut(self.members.get_mut(member).ok_or_else(|| unknown_member(group, member))?);
        if generation == current && owned.is_empty() {
            m.synced_generation = current;
        }
        m.owned = owned;
        Ok(self.assignment(member).expect("member exists"))
    }

    /// Checks that `member` (or an administrator, when `None`) may commit `offsets`.
    pub fn check_commit(
        &self,
        group: &str,
        member: Option<&str>,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<(), MetaError> {
        match member {
            None => {
                if !self.members.is_empty() {
                    return Err(MetaError::Conflict(format!(
                        "group \"{group}\" has {} active members; only a member may commit, or stop them first",
                        self.members.len()
                    )));
                }
            }
            Some(id) => {
                let m = self.members.get(id).ok_or_else(|| unknown_member(group, id))?;
                // What the member owns needs no further look; its assignment is worked out only
                // for a partition it does not own yet.
                let mut assigned = None;
                for (tp, _) in offsets {
                    let (t, p) = tp;
                    if !m.owned.contains(tp)
                        && !assigned.get_or_insert_with(|| self.assigned(id)).contains(tp)
                    {
                        return Err(MetaError::Fenced(format!(
                            "partition {t}/{p} is not assigned to member {id} of group \"{group}\" (generation {})",
                            self.generation
                        )));
                    }
                }
            }
        }
        for (tp, o) in offsets {
            let (t, p) = tp;
            if let Some(c) = self.offsets.get(tp)
                && o < c
            {
                return Err(MetaError::Invalid(format!(
                    "offsets: {t}/{p} offset {o} is below the committed offset {c}; committed offsets only go back through reset-offsets"
                )));
            }
        }
        if self.offsets.len() + offsets.len() > OFFSETS_PER_GROUP_MAX {
            let new = offsets.iter().filter(|(tp, _)| !self.offsets.contains_key(tp)).count();
            if self.offsets.len() + new > OFFSETS_PER_GROUP_MAX {
                return Err(MetaError::Invalid(format!(
                    "offsets: a group holds at most {OFFSETS_PER_GROUP_MAX} committed offsets"
                )));
            }
        }
        Ok(())
    }

    /// Recomputes every member's target from the current members and topics; bumps the
    /// generation when the membership or any target changed (`membership_changed` says whether
    /// the caller added or removed a member).
    pub fn rebalance(&mut self, topics: &Topics, membership_changed: bool) {
        let subs: BTreeMap<String, BTreeSet<String>> =
            self.members.iter().map(|(id, m)| (id.clone(), m.topics.clone())).collect();
        let previous: BTreeMap<String, BTreeSet<TopicPartition>> =
            self.members.iter().map(|(id, m)| (id.clone(), m.target.clone())).collect();
        let targets = match self.assignor {
            Assignor::Range => assign_range(&subs, topics),
            Assignor::RoundRobin => assign_round_robin(&subs, topics),
            Assignor::CooperativeSticky => assign_sticky(&subs, topics, &previous),
        };
        let changed = targets != previous;
        for (id, target) in targets {
            if let Some(m) = self.members.get_mut(&id)
                && m.target != target
            {
                Arc::make_mut(m).target = target;
            }
        }
        if changed || membership_changed {
            self.generation += 1;
        }
    }
}

fn unknown_member(group: &str, member: &str) -> MetaError {
    MetaError::Fenced(format!(
        "member {member} is not in group \"{group}\" (its session expired, or it left); join again"
    ))
}

/// The partitions each subscribed topic has, in order.
fn partitions_of(subs: &BTreeMap<String, BTreeSet<String>>, topics: &Topics) -> Vec<TopicPartition> {
    let wanted: BTreeSet<&String> = subs.values().flatten().collect();
    wanted
        .into_iter()
        .filter_map(|t| topics.get(t))
        .flat_map(|t| (0..t.partitions.len() as u32).map(|p| (t.name.clone(), p)))
        .collect()
}

fn empty_targets(subs: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    subs.keys().map(|id| (id.clone(), BTreeSet::new())).collect()
}

/// Kafka's range assignor: per topic, the subscribed members in id order each get a contiguous
/// range; the first `n % k` get one more.
fn assign_range(
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &Topics,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut out = empty_targets(subs);
    let wanted: BTreeSet<&String> = subs.values().flatten().collect();
    for t in wanted.into_iter().filter_map(|t| topics.get(t)) {
        let members: Vec<&String> =
            subs.iter().filter(|(_, s)| s.contains(&t.name)).map(|(id, _)| id).collect();
        let (n, k) = (t.partitions.len(), members.len());
        let mut next = 0;
        for (i, id) in members.iter().enumerate() {
            let count = n / k + usize::from(i < n % k);
            let set = out.get_mut(*id).expect("every member has a target");
            set.extend((next..next + count).map(|p| (t.name.clone(), p as u32)));
            next += count;
        }
    }
    out
}

/// Round-robin over every partition in (topic, partition) order, skipping members that do not
/// subscribe to the partition's topic.
fn assign_round_robin(
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &Topics,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut out = empty_targets(subs);
    let members: Vec<&String> = subs.keys().collect();
    let mut turn = 0;
    for tp in partitions_of(subs, topics) {
        for step in 0..members.len() {
            let id = members[(turn + step) % members.len()];
            if subs[id].contains(&tp.0) {
                out.get_mut(id).expect("every member has a target").insert(tp);
                turn = (turn + step + 1) % members.len();
                break;
            }
        }
    }
    out
}

/// The sticky assignor: keeps every partition with its current member, gives unowned partitions
/// to the least-loaded eligible member, then moves partitions from the most to the least loaded
/// member until loads differ by at most one (where subscriptions allow).
fn assign_sticky(
    subs: &BTreeMap<String, BTreeSet<String>>,
    topics: &Topics,
    previous: &BTreeMap<String, BTreeSet<TopicPartition>>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let all: BTreeSet<TopicPartition> = partitions_of(subs, topics).into_iter().collect();
    let mut out = empty_targets(subs);
    let mut placed = BTreeSet::new();
    for (id, prev) in previous {
        let Some(set) = out.get_mut(id) else { continue };
        for tp in prev {
            if all.contains(tp) && subs[id].contains(&tp.0) && placed.insert(tp.clone()) {
                set.insert(tp.clone());
            }
        }
    }
    for tp in all.iter().filter(|tp| !placed.contains(*tp)) {
        let best = subs
            .iter()
            .filter(|(_, s)| s.contains(&tp.0))
            .map(|(id, _)| id)
            .min_by_key(|id| (out[*id].len(), (*id).clone()))
            .cloned();
        if let Some(id) = best {
            out.get_mut(&id).expect("eligible members have targets").insert(tp.clone());
        }
    }
    // Each move lowers the spread, so this ends; the bound only guards against a bug.
    for _ in 0..=all.len() * subs.len() {
        let mut moved = false;
        let mut by_load: Vec<(usize, String)> = out.iter().map(|(id, s)| (s.len(), id.clone())).collect();
        by_load.sort();
        'outer: for (hi_len, hi) in by_load.iter().rev() {
            for (lo_len, lo) in by_load.iter() {
                if hi_len <= &(lo_len + 1) {
                    break;
                }
                let candidate = out[hi].iter().rev().find(|tp| subs[lo].contains(&tp.0)).cloned();
                if let Some(tp) = candidate {
                    out.get_mut(hi).expect("member").remove(&tp);
                    out.get_mut(lo).expect("member").insert(tp);
                    moved = true;
                    break 'outer;
                }
            }
        }
        if !moved {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::meta::state::PartitionRecord;
    use crate::meta::state::TopicRecord;

    fn topics(spec: &[(&str, u32)]) -> Topics {
        spec.iter()
            .map(|(name, n)| {
                let partitions = (0..*n)
                    .map(|i| PartitionRecord {
                        group_id: u64::from(i) + 1,
                        replicas: vec![1],
                        initial_replicas: vec![1],
                        target: None,
                    })
                    .collect();
                let t = TopicRecord {
                    name: (*name).to_owned(),
                    partitions,
                    replication_factor: 1,
                    config: BTreeMap::new(),
                };
                ((*name).to_owned(), std::sync::Arc::new(t))
            })
            .collect()
    }

    fn member(topics: &[&str]) -> MemberRecord {
        MemberRecord {
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            session_timeout_ms: 10_000,
            target: BTreeSet::new(),
            owned: BTreeSet::new(),
            synced_generation: 0,
        }
    }

    fn group(assignor: Assignor, members: &[&str], subs: &[&str]) -> GroupRecord {
        let mut g = GroupRecord::new(assignor);
        for m in members {
            g.members.insert((*m).to_owned(), Arc::new(member(subs)));
        }
        g
    }

    fn loads(g: &GroupRecord) -> Vec<usize> {
        g.members.values().map(|m| m.target.len()).collect()
    }

    /// `assigned` and `rebalancing` agree with their definitions (which look at every other
    /// member's partitions, where the real ones take shortcuts).
    fn check_fast_paths(g: &GroupRecord) -> Result<(), TestCaseError> {
        for (id, m) in &g.members {
            let by_definition: BTreeSet<TopicPartition> = if g.assignor.is_eager() {
                if g.members.values().all(|o| o.synced_generation == g.generation) {
                    m.target.clone()
                } else {
                    BTreeSet::new()
                }
            } else {
                let elsewhere: BTreeSet<&TopicPartition> =
                    g.members.iter().filter(|(o, _)| *o != id).flat_map(|(_, o)| o.owned.iter()).collect();
                m.target.iter().filter(|tp| !elsewhere.contains(tp)).cloned().collect()
            };
            prop_assert_eq!(&g.assigned(id), &by_definition, "assigned({})", id);
        }
        let by_definition = g.members.iter().any(|(id, m)| m.owned != m.target || g.assigned(id) != m.target);
        prop_assert_eq!(g.rebalancing(), by_definition);
        Ok(())
    }

    /// Every member reports owning exactly what it is assigned, until nothing changes.
    fn settle(g: &mut GroupRecord) {
        for _ in 0..10 {
            let ids: Vec<String> = g.members.keys().cloned().collect();
            for id in &ids {
                let gen_ = g.generation;
                let owned = g.assigned(id);
                // An eager member first gives everything up.
                let owned = if g.assignor.is_eager() && g.members[id].synced_generation != gen_ {
                    BTreeSet::new()
                } else {
                    owned
                };
                g.heartbeat("g", id, gen_, owned).expect("member");
            }
            if !g.rebalancing() {
                return;
            }
        }
        panic!("group did not settle: {g:?}");
    }

    #[test]
    fn range_gives_contiguous_ranges_per_topic() {
        let t = topics(&[("a", 7)]);
        let mut g = group(Assignor::Range, &["m1", "m2", "m3"], &["a"]);
        g.rebalance(&t, true);
        let p = |id: &str| g.members[id].target.iter().map(|(_, p)| *p).collect::<Vec<_>>();
        assert_eq!(p("m1"), vec![0, 1, 2]);
        assert_eq!(p("m2"), vec![3, 4]);
        assert_eq!(p("m3"), vec![5, 6]);
    }

    #[test]
    fn round_robin_skips_members_not_subscribed() {
        let t = topics(&[("a", 2), ("b", 2)]);
        let mut g = GroupRecord::new(Assignor::RoundRobin);
        g.members.insert("m1".into(), Arc::new(member(&["a", "b"])));
        g.members.insert("m2".into(), Arc::new(member(&["b"])));
        g.rebalance(&t, true);
        assert!(g.members["m2"].target.iter().all(|(t, _)| t == "b"));
        assert_eq!(loads(&g).iter().sum::<usize>(), 4);
    }

    #[test]
    fn sticky_moves_only_what_balance_needs_when_a_member_joins() {
        let t = topics(&[("jobs", 6)]);
        let mut g = group(Assignor::CooperativeSticky, &["m1", "m2"], &["jobs"]);
        g.rebalance(&t, true);
        settle(&mut g);
        let before: BTreeMap<String, BTreeSet<TopicPartition>> =
            g.members.iter().map(|(id, m)| (id.clone(), m.target.clone())).collect();
        g.members.insert("m3".into(), Arc::new(member(&["jobs"])));
        g.rebalance(&t, true);
        assert_eq!(loads(&g), vec![2, 2, 2]);
        // m1 and m2 keep two of their three partitions each.
        for id in ["m1", "m2"] {
            assert!(g.members[id].target.is_subset(&before[id]), "{id} got a new partition");
        }
        // m3 may not consume its partitions before their owners give them up.
        assert!(g.assigned("m3").is_empty());
        assert!(g.rebalancing());
        settle(&mut g);
        assert_eq!(g.assigned("m3").len(), 2);
    }

    #[test]
    fn eager_revokes_everything_before_assigning() {
        let t = topics(&[("jobs", 4)]);
        let mut g = group(Assignor::Range, &["m1", "m2"], &["jobs"]);
        g.rebalance(&t, true);
        settle(&mut g);
        assert_eq!(g.assigned("m1").len(), 2);
        g.members.insert("m3".into(), Arc::new(member(&["jobs"])));
        g.rebalance(&t, true);
        assert!(g.assigned("m1").is_empty(), "eager: nothing is assigned until every member synced");
        let gen_ = g.generation;
        g.heartbeat("g", "m1", gen_, BTreeSet::new()).unwrap();
        g.heartbeat("g", "m2", gen_, BTreeSet::new()).unwrap();
        assert!(g.assigned("m1").is_empty(), "m3 has not synced yet");
        g.heartbeat("g", "m3", gen_, BTreeSet::new()).unwrap();
        assert_eq!(g.assigned("m1").len() + g.assigned("m2").len() + g.assigned("m3").len(), 4);
    }

    #[test]
    fn commits_are_fenced_and_monotonic() {
        let t = topics(&[("jobs", 2)]);
        let mut g = group(Assignor::CooperativeSticky, &["m1", "m2"], &["jobs"]);
        g.rebalance(&t, true);
        settle(&mut g);
        let mine = g.assigned("m1").into_iter().next().unwrap();
        let theirs = g.assigned("m2").into_iter().next().unwrap();
        assert!(g.check_commit("g", Some("m1"), &[(mine.clone(), 5)]).is_ok());
        assert!(matches!(g.check_commit("g", Some("m1"), &[(theirs, 5)]), Err(MetaError::Fenced(_))));
        assert!(matches!(g.check_commit("g", Some("gone"), &[(mine.clone(), 5)]), Err(MetaError::Fenced(_))));
        assert!(matches!(g.check_commit("g", None, &[(mine.clone(), 5)]), Err(MetaError::Conflict(_))));
        g.offsets.insert(mine.clone(), 5);
        assert!(matches!(g.check_commit("g", Some("m1"), &[(mine, 4)]), Err(MetaError::Invalid(_))));
    }

    proptest! {
        /// Whatever the members and subscriptions, every assignor gives each subscribed
        /// partition to exactly one subscribed member; sticky and round-robin (with equal
        /// subscriptions) balance loads within one.
        #[test]
        fn assignors_cover_every_partition_once(
            counts in proptest::collection::vec(1u32..8, 1..4),
            members in 1usize..6,
            assignor in prop_oneof![Just(Assignor::CooperativeSticky), Just(Assignor::Range), Just(Assignor::RoundRobin)],
            churn in proptest::collection::vec(any::<bool>(), 0..6),
        ) {
            let spec: Vec<(String, u32)> = counts.iter().enumerate().map(|(i, n)| (format!("t{i}"), *n)).collect();
            let spec_ref: Vec<(&str, u32)> = spec.iter().map(|(n, c)| (n.as_str(), *c)).collect();
            let t = topics(&spec_ref);
            let names: Vec<&str> = spec.iter().map(|(n, _)| n.as_str()).collect();
            let mut g = GroupRecord::new(assignor);
            let mut next = 0;
            for _ in 0..members {
                g.members.insert(format!("m{next}"), Arc::new(member(&names)));
                next += 1;
            }
            g.rebalance(&t, true);
            for add in churn {
                if add || g.members.len() == 1 {
                    g.members.insert(format!("m{next}"), Arc::new(member(&names)));
                    next += 1;
                } else {
                    let first = g.members.keys().next().cloned().unwrap();
                    g.members.remove(&first);
                }
                g.rebalance(&t, true);
                // Some members report part of what they were assigned, as mid-rebalance.
                let ids: Vec<String> = g.members.keys().cloned().collect();
                for (i, id) in ids.iter().enumerate() {
                    if i % 2 == 0 {
                        let owned: BTreeSet<TopicPartition> = g.assigned(id).into_iter().step_by(2).collect();
                        let gen_ = g.generation;
                        g.heartbeat("g", id, gen_, owned).expect("member");
                    }
                }
                check_fast_paths(&g)?;
            }
            let total: usize = counts.iter().map(|n| *n as usize).sum();
            let mut seen = BTreeSet::new();
            for m in g.members.values() {
                for tp in &m.target {
                    prop_assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
                }
            }
            prop_assert_eq!(seen.len(), total);
            if assignor != Assignor::Range {
                let l = loads(&g);
                prop_assert!(l.iter().max().unwrap() - l.iter().min().unwrap() <= 1, "loads {l:?}");
            }
            settle(&mut g);
            check_fast_paths(&g)?;
            let consumed: usize = g.members.keys().map(|id| g.assigned(id).len()).sum();
            prop_assert_eq!(consumed, total);
        }
    }
}
