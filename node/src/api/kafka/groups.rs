//! Kafka's classic consumer-group protocol: FindCoordinator, JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, OffsetCommit, OffsetFetch, ListGroups, DescribeGroups.
//!
//! In the classic protocol the clients assign partitions (the group's leader member runs the
//! assignor and hands the result to the coordinator in SyncGroup), so the coordinator only runs
//! the rebalance barrier: it collects the members' joins, picks a protocol every member
//! supports, names a leader, and passes the leader's assignment on. That barrier lives in memory
//! on the metadata leader, which is every group's coordinator; the committed offsets go through
//! the metadata group (`MetaCommand::CommitOffsets`, after this coordinator has checked the
//! member and generation), so they are replicated and fenced like every other commit, and
//! `eddyctl group describe` shows them with their lag. When the metadata leadership moves, the
//! new coordinator starts without members: clients get `NOT_COORDINATOR`, find it, and rejoin
//! (one rebalance), and resume from the committed offsets.
//!
//! States, as Kafka names them: `Empty` → (a join) `PreparingRebalance` → (every member
//! rejoined, or the rebalance timeout passed) `CompletingRebalance` → (the leader's SyncGroup)
//! `Stable`; a join, leave or expired session in any state starts another rebalance.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codes;
use crate::meta::MetaCommand;
use crate::service::BrokerState;
use crate::service::META_WRITE_TIMEOUT;

/// How long a new group's first rebalance waits for more members (Kafka's
/// `group.initial.rebalance.delay.ms` is 3 s; shorter here for a quicker start).
pub const INITIAL_REBALANCE_DELAY: Duration = Duration::from_millis(1000);
/// How often sessions and rebalance deadlines are checked.
pub const TICK: Duration = Duration::from_millis(250);
const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<i32> = 1_000..=300_000;
const MEMBERS_MAX: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

/// A JoinGroup's answer.
#[derive(Debug, Clone, Default)]
pub struct Joined {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Every member's id and metadata, for the leader only.
    pub members: Vec<(String, Bytes)>,
}

/// A SyncGroup's answer: an error code, or the member's assignment.
pub type Synced = Result<Bytes, i16>;

struct Member {
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_seen: Instant,
    join: Option<oneshot::Sender<Joined>>,
    sync: Option<oneshot::Sender<Synced>>,
}

impl Member {
    /// The metadata this member sent for `protocol` (empty if it sent none).
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols.iter().find(|(n, _)| n == protocol).map(|(_, b)| b.clone()).unwrap_or_default()
    }
}

struct Group {
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with `MEMBER_ID_REQUIRED` and not yet joined, until when.
    pending: BTreeMap<String, Instant>,
    /// When the current rebalance completes whoever has joined; and, for a group that was
    /// empty, the initial delay before which it does not complete early.
    deadline: Option<Instant>,
    not_before: Option<Instant>,
}

impl Group {
    fn new() -> Self {
        Self {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: BTreeMap::new(),
            deadline: None,
            not_before: None,
        }
    }

    /// Starts a rebalance (or goes on with the current one).
    fn prepare_rebalance(&mut self, now: Instant) {
        if self.state == State::PreparingRebalance {
            return;
        }
        // Members waiting for the leader's assignment learn that it will not come.
        for m in self.members.values_mut() {
            if let Some(tx) = m.sync.take() {
                let _ = tx.send(Err(codes::REBALANCE_IN_PROGRESS));
            }
        }
        let timeout = self.members.values().map(|m| m.rebalance_timeout).max().unwrap_or(Duration::ZERO);
        if self.state == State::Empty {
            self.not_before = Some(now + INITIAL_REBALANCE_DELAY);
        }
        self.deadline = Some(now + timeout.max(INITIAL_REBALANCE_DELAY));
        self.state = State::PreparingRebalance;
    }

    /// Completes the join phase when every member has rejoined (and any initial delay is over),
    /// or when `forced` (the deadline passed: members that did not rejoin are dropped).
    fn maybe_complete_join(&mut self, now: Instant, forced: bool) {
        if self.state != State::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.join.is_some());
        if !(forced || all_joined && self.not_before.is_none_or(|t| now >= t)) {
            return;
        }
        self.members.retain(|_, m| m.join.is_some());
        self.generation += 1;
        self.deadline = None;
        self.not_before = None;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.protocol_type = None;
            self.leader = None;
            return;
        }
        // The first protocol, in the first member's order of preference, that every member
        // supports (joins with none in common were refused).
        let first = self.members.values().next().expect("a member");
        self.protocol = first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| self.members.values().all(|m| m.protocols.iter().any(|(n, _)| n == *name)))
            .cloned();
        if self.leader.as_ref().is_none_or(|l| !self.members.contains_key(l)) {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.clone().unwrap_or_default();
        let protocol = self.protocol.clone().unwrap_or_default();
        let everyone: Vec<(String, Bytes)> =
            self.members.iter().map(|(id, m)| (id.clone(), m.metadata_for(&protocol))).collect();
        self.state = State::CompletingRebalance;
        for (id, m) in &mut self.members {
            m.last_seen = now;
            m.assignment = Bytes::new();
            if let Some(tx) = m.join.take() {
                let _ = tx.send(Joined {
                    error: codes::NONE,
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol: self.protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader { everyone.clone() } else { Vec::new() },
                });
            }
        }
    }

    fn remove_member(&mut self, id: &str, now: Instant) -> bool {
        let Some(m) = self.members.remove(id) else { return false };
        if let Some(tx) = m.join {
            let _ = tx.send(Joined { error: codes::UNKNOWN_MEMBER_ID, ..Default::default() });
        }
        if let Some(tx) = m.sync {
            let _ = tx.send(Err(codes::UNKNOWN_MEMBER_ID));
        }
        if self.members.is_empty() && self.state != State::PreparingRebalance {
            self.state = State::Empty;
            self.generation += 1;
            self.leader = None;
            self.protocol = None;
            self.protocol_type = None;
        } else {
            self.prepare_rebalance(now);
            self.maybe_complete_join(now, false);
        }
        true
    }

    /// The error for a request of `member` in `generation`, if any.
    fn check(&self, member: &str, generation: i32) -> Option<i16> {
        if !self.members.contains_key(member) {
            Some(codes::UNKNOWN_MEMBER_ID)
        } else if generation != self.generation {
            Some(codes::ILLEGAL_GENERATION)
        } else {
            None
        }
    }
}

/// The coordinator's groups, on the node that leads the metadata group.
#[derive(Default)]
pub struct KafkaGroups {
    groups: Mutex<BTreeMap<String, Group>>,
    next_member: std::sync::atomic::AtomicU64,
}

/// What a join asks.
pub struct Join {
    pub group: String,
    pub member_id: String,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4 and later: a member without an id is given one and asked to join again.
    pub member_id_required: bool,
}

/// A described group, for DescribeGroups and ListGroups.
pub struct Described {
    pub state: State,
    pub protocol_type: String,
    pub protocol: String,
    /// (member id, client id, client host, metadata, assignment)
    pub members: Vec<(String, String, String, Bytes, Bytes)>,
}

impl KafkaGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every group (this node is not the coordinator any more): waiting members are told
    /// `NOT_COORDINATOR` and find the new one.
    pub fn clear(&self) {
        let mut groups = self.lock();
        for g in groups.values_mut() {
            for m in g.members.values_mut() {
                if let Some(tx) = m.join.take() {
                    let _ = tx.send(Joined { error: codes::NOT_COORDINATOR, ..Default::default() });
                }
                if let Some(tx) = m.sync.take() {
                    let _ = tx.send(Err(codes::NOT_COORDINATOR));
                }
            }
        }
        groups.clear();
    }

    /// Expires sessions and completes rebalances whose deadline passed; run every [`TICK`].
    pub fn tick(&self, now: Instant) {
        let mut groups = self.lock();
        for g in groups.values_mut() {
            g.pending.retain(|_, until| *until > now);
            let expired: Vec<String> = g
                .members
                .iter()
                .filter(|(_, m)| {
                    m.join.is_none() && m.sync.is_none() && m.last_seen + m.session_timeout < now
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(member = %id, "kafka group member's session expired");
                g.remove_member(&id, now);
            }
            if g.deadline.is_some_and(|d| d <= now) {
                g.maybe_complete_join(now, true);
            } else {
                g.maybe_complete_join(now, false);
            }
        }
        groups.retain(|_, g| g.state != State::Empty || !g.pending.is_empty());
    }

    pub async fn join(&self, j: Join) -> Joined {
        let refuse = |error| Joined { error, member_id: j.member_id.clone(), ..Default::default() };
        if j.group.is_empty() {
            return refuse(codes::INVALID_GROUP_ID);
        }
        if !SESSION_TIMEOUT_MS.contains(&j.session_timeout_ms) {
            return refuse(codes::INVALID_SESSION_TIMEOUT);
        }
        if j.protocol_type.is_empty() || j.protocols.is_empty() {
            return refuse(codes::INCONSISTENT_GROUP_PROTOCOL);
        }
        let now = Instant::now();
        let rx = {
            let mut groups = self.lock();
            let g = groups.entry(j.group.clone()).or_insert_with(Group::new);
            if !g.members.is_empty()
                && (g.protocol_type.as_deref() != Some(j.protocol_type.as_str())
                    || !j.protocols.iter().any(|(name, _)| {
                        g.members.values().all(|m| m.protocols.iter().any(|(n, _)| n == name))
                    }))
            {
                return refuse(codes::INCONSISTENT_GROUP_PROTOCOL);
            }
            let mut member_id = j.member_id.clone();
            if member_id.is_empty() {
                if g.members.len() + g.pending.len() >= MEMBERS_MAX {
                    return refuse(codes::GROUP_MAX_SIZE_REACHED);
                }
                let n = self.next_member.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                member_id = format!("{}-{n}", if j.client_id.is_empty() { "member" } else { &j.client_id });
                if j.member_id_required {
                    let session = Duration::from_millis(j.session_timeout_ms as u64);
                    g.pending.insert(member_id.clone(), now + session);
                    return Joined { error: codes::MEMBER_ID_REQUIRED, member_id, ..Default::default() };
                }
            } else if !g.members.contains_key(&member_id) && g.pending.remove(&member_id).is_none() {
                return refuse(codes::UNKNOWN_MEMBER_ID);
            }
            let (tx, rx) = oneshot::channel();
            let rebalance_ms =
                if j.rebalance_timeout_ms > 0 { j.rebalance_timeout_ms } else { j.session_timeout_ms };
            let m = g.members.entry(member_id.clone()).or_insert_with(|| Member {
                client_id: j.client_id.clone(),
                client_host: j.client_host.clone(),
                session_timeout: Duration::ZERO,
                rebalance_timeout: Duration::ZERO,
                protocols: Vec::new(),
                assignment: Bytes::new(),
                last_seen: now,
                join: None,
                sync: None,
            });
            m.session_timeout = Duration::from_millis(j.session_timeout_ms as u64);
            m.rebalance_timeout = Duration::from_millis(rebalance_ms.clamp(0, 1_800_000) as u64);
            m.protocols = j.protocols;
            m.last_seen = now;
            if let Some(old) = m.join.replace(tx) {
                let _ = old.send(Joined { error: codes::UNKNOWN_MEMBER_ID, ..Default::default() });
            }
            g.protocol_type = Some(j.protocol_type);
            g.prepare_rebalance(now);
            g.maybe_complete_join(now, false);
            rx
        };
        rx.await.unwrap_or(Joined { error: codes::NOT_COORDINATOR, ..Default::default() })
    }

    pub async fn sync(
        &self,
        group: &str,
        member: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> Synced {
        let rx = {
            let mut groups = self.lock();
            let Some(g) = groups.get_mut(group) else { return Err(codes::UNKNOWN_MEMBER_ID) };
            if let Some(e) = g.check(member, generation) {
                return Err(e);
            }
            match g.state {
                State::Empty | State::PreparingRebalance => return Err(codes::REBALANCE_IN_PROGRESS),
                State::Stable => return Ok(g.members[member].assignment.clone()),
                State::CompletingRebalance => {}
            }
            if g.leader.as_deref() == Some(member) {
                for (id, a) in assignments {
                    if let Some(m) = g.members.get_mut(&id) {
                        m.assignment = a;
                    }
                }
                g.state = State::Stable;
                let now = Instant::now();
                for m in g.members.values_mut() {
                    m.last_seen = now;
                    if let Some(tx) = m.sync.take() {
                        let _ = tx.send(Ok(m.assignment.clone()));
                    }
                }
                return Ok(g.members[member].assignment.clone());
            }
            let (tx, rx) = oneshot::channel();
            let m = g.members.get_mut(member).expect("checked");
            m.sync = Some(tx);
            rx
        };
        rx.await.unwrap_or(Err(codes::NOT_COORDINATOR))
    }

    pub fn heartbeat(&self, group: &str, member: &str, generation: i32) -> i16 {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group) else { return codes::UNKNOWN_MEMBER_ID };
        if let Some(e) = g.check(member, generation) {
            return e;
        }
        g.members.get_mut(member).expect("checked").last_seen = Instant::now();
        match g.state {
            State::PreparingRebalance => codes::REBALANCE_IN_PROGRESS,
            _ => codes::NONE,
        }
    }

    /// Removes members; each one's error code.
    pub fn leave(&self, group: &str, members: &[String]) -> Vec<i16> {
        let mut groups = self.lock();
        let now = Instant::now();
        members
            .iter()
            .map(|id| {
                let removed = groups.get_mut(group).is_some_and(|g| g.remove_member(id, now));
                if removed { codes::NONE } else { codes::UNKNOWN_MEMBER_ID }
            })
            .collect()
    }

    /// Whether `member` in `generation` may commit now (`None`), or the error. A commit without
    /// a member (generation -1) is allowed only while the group has no members.
    pub fn check_commit(&self, group: &str, member: &str, generation: i32) -> Option<i16> {
        let groups = self.lock();
        let g = groups.get(group);
        if generation < 0 && member.is_empty() {
            return g.is_some_and(|g| !g.members.is_empty()).then_some(codes::UNKNOWN_MEMBER_ID);
        }
        let Some(g) = g else { return Some(codes::UNKNOWN_MEMBER_ID) };
        if let Some(e) = g.check(member, generation) {
            return Some(e);
        }
        (g.state == State::PreparingRebalance).then_some(codes::REBALANCE_IN_PROGRESS)
    }

    pub fn describe(&self, group: &str) -> Option<Described> {
        let groups = self.lock();
        let g = groups.get(group)?;
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(Described {
            state: g.state,
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: protocol.clone(),
            members: g
                .members
                .iter()
                .map(|(id, m)| {
                    let meta = m.metadata_for(&protocol);
                    (id.clone(), m.client_id.clone(), m.client_host.clone(), meta, m.assignment.clone())
                })
                .collect(),
        })
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }
}

/// Whether this node coordinates groups now (it leads the metadata group); when it does not,
/// any groups it held are dropped.
pub fn is_coordinator(broker: &BrokerState, groups: &KafkaGroups) -> bool {
    let me = broker.meta.leader() == Some(broker.me);
    if !me {
        groups.clear();
    }
    me
}

/// Commits offsets (checked by the caller), each with its metadata string, through the
/// metadata group.
pub async fn commit(
    broker: &BrokerState,
    group: &str,
    offsets: Vec<((String, u32), u64, String)>,
) -> Result<(), i16> {
    let cmd = MetaCommand::CommitOffsetsWithMetadata { group: group.to_owned(), offsets };
    broker.meta.write(cmd, META_WRITE_TIMEOUT).await.map(|_| ()).map_err(|e| codes::code(&e))
}

/// Runs [`KafkaGroups::tick`] until `cancel`.
pub async fn run_ticks(groups: Arc<KafkaGroups>, cancel: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            // Both arms only wait.
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => groups.tick(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(group: &str, member: &str, protocols: &[&str]) -> Join {
        Join {
            group: group.into(),
            member_id: member.into(),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 5_000,
            protocol_type: "consumer".into(),
            protocols: protocols.iter().map(|p| (p.to_string(), Bytes::from(p.to_string()))).collect(),
            member_id_required: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_forms_syncs_and_rebalances_when_a_member_leaves() {
        let groups = Arc::new(KafkaGroups::default());
        // The first join is given an id to join with.
        let first = groups.join(join("g", "", &["range"])).await;
        assert_eq!(first.error, codes::MEMBER_ID_REQUIRED);
        let second = groups.join(join("g", "", &["roundrobin", "range"])).await;
        let (a, b) = (first.member_id.clone(), second.member_id.clone());
        assert_ne!(a, b);
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(run_ticks(groups.clone(), cancel.clone()));
        // Both join; the rebalance completes after the initial delay.
        let ja = tokio::spawn({
            let g = groups.clone();
            let a = a.clone();
            async move { g.join(join("g", &a, &["range"])).await }
        });
        let jb = tokio::spawn({
            let g = groups.clone();
            let b = b.clone();
            async move { g.join(join("g", &b, &["roundrobin", "range"])).await }
        });
        let (ja, jb) = (ja.await.expect("join"), jb.await.expect("join"));
        assert_eq!((ja.error, jb.error), (0, 0));
        assert_eq!(ja.generation, 1);
        assert_eq!(ja.protocol.as_deref(), Some("range"), "the protocol both support");
        let (leader, follower) = if ja.leader == a { (ja, jb) } else { (jb, ja) };
        assert_eq!(leader.members.len(), 2, "the leader gets every member");
        assert!(follower.members.is_empty());
        // The follower waits in SyncGroup for the leader's assignment.
        let sf = tokio::spawn({
            let g = groups.clone();
            let id = follower.member_id.clone();
            async move { g.sync("g", &id, 1, vec![]).await }
        });
        tokio::task::yield_now().await;
        let assignments = vec![
            (leader.member_id.clone(), Bytes::from_static(b"A")),
            (follower.member_id.clone(), Bytes::from_static(b"B")),
        ];
        assert_eq!(groups.sync("g", &leader.member_id, 1, assignments).await, Ok(Bytes::from_static(b"A")));
        assert_eq!(sf.await.expect("sync"), Ok(Bytes::from_static(b"B")));
        assert_eq!(groups.heartbeat("g", &follower.member_id, 1), 0);
        assert_eq!(groups.heartbeat("g", &follower.member_id, 0), codes::ILLEGAL_GENERATION);
        assert_eq!(groups.heartbeat("g", "nobody", 1), codes::UNKNOWN_MEMBER_ID);
        assert_eq!(groups.check_commit("g", &follower.member_id, 1), None);
        assert_eq!(groups.check_commit("g", "", -1), Some(codes::UNKNOWN_MEMBER_ID), "the group has members");
        // The leader leaves: the other member's heartbeat says to rejoin; alone, it completes at once.
        assert_eq!(groups.leave("g", std::slice::from_ref(&leader.member_id)), vec![0]);
        assert_eq!(groups.heartbeat("g", &follower.member_id, 1), codes::REBALANCE_IN_PROGRESS);
        assert_eq!(groups.check_commit("g", &follower.member_id, 1), Some(codes::REBALANCE_IN_PROGRESS));
        let again = groups.join(join("g", &follower.member_id, &["range"])).await;
        assert_eq!(
            (again.error, again.generation, again.leader.as_str()),
            (0, 2, follower.member_id.as_str())
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_session_and_an_incompatible_protocol() {
        let groups = Arc::new(KafkaGroups::default());
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(run_ticks(groups.clone(), cancel.clone()));
        let mut j = join("g", "", &["range"]);
        j.member_id_required = false;
        let joined = groups.join(j).await;
        assert_eq!(joined.error, 0, "v3 and earlier join at once, after the initial delay");
        assert_eq!(
            groups.join(join("g", "", &["cooperative-sticky"])).await.error,
            codes::INCONSISTENT_GROUP_PROTOCOL
        );
        assert_eq!(groups.sync("g", &joined.member_id, 1, vec![]).await, Ok(Bytes::new()));
        tokio::time::advance(Duration::from_secs(11)).await;
        groups.tick(Instant::now());
        assert_eq!(groups.heartbeat("g", &joined.member_id, 1), codes::UNKNOWN_MEMBER_ID, "expired");
        assert!(groups.names().is_empty(), "an empty group is forgotten (its offsets are in the metadata)");
        cancel.cancel();
    }
}
