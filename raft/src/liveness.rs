//! Node liveness, and elections driven by it: what lets thousands of partition groups sit idle
//! at no cost.
//!
//! Partition groups run with openraft's ticker off (`enable_tick = false`): an idle group has no
//! timer, sends no heartbeat, and never times out. Liveness is judged once per *node* instead:
//! every node sends each peer one small [`LivenessProbe`] (a UDP datagram to the peer's Raft
//! port number) every [`HEARTBEAT_INTERVAL`], and a peer that has answered no probe sent in the
//! last [`DOWN_AFTER`] is judged down. The cost grows with the number of nodes, not of groups
//! (the approach of CockroachDB's store liveness and of Redpanda's per-node heartbeat manager;
//! openraft's tick, heartbeat and election can all be driven from outside, which is what this
//! module does).
//!
//! In production the probes are sent, answered and judged on an OS thread with a runtime of its
//! own ([`Liveness::run_probes`]), apart from the node's runtime and its thousands of group
//! tasks: a busy node answers at once, so load does not make a live node look down (which at
//! thousands of partitions turned into storms of elections). What the probes cannot see, a
//! process whose threads run while its runtime does not, is covered by [`Liveness::pulse`]: a
//! node whose runtime made no progress for [`WEDGED_AFTER`] stops answering. Over UDP a lost
//! datagram is just a missed round, with no connection to stall behind bulk Raft traffic.
//!
//! Wake-ups (below) need a reliable delivery and go over the Raft gRPC service instead
//! (`Heartbeat`, [`Liveness::run_wakes`]), only when a node has some to send.
//!
//! Each partition group has a [`GroupWatch`] task that sleeps on two watches, the group's server
//! state (leader, vote, membership) and the [`LivenessView`], and so wakes only when one of them
//! changes:
//! - a follower whose leader is judged down campaigns at once, one voter at a time by a rank
//!   derived from the group id (no split votes when a thousand groups fail over together), with
//!   Pre-Vote, retrying with backoff until some leader is known;
//! - a follower that knows no leader (after its own restart, or when a leader changed while it
//!   was away) first asks its peers to wake it (a [`Wake`] in the next wake-up call: the peer
//!   leading the group sends it a heartbeat at once), and campaigns only after [`WAKE_GRACE`];
//! - a leader sends one heartbeat to its followers when one of their nodes comes back up (a
//!   restart, or the end of a partition or a freeze), so that a returning node learns the
//!   current leaders and terms without any group keeping a timer.
//!
//! Leader stickiness: a replica refuses a Pre-Vote while the leader it follows is judged alive
//! here (see `RaftService::pre_vote`), so a node that was frozen or partitioned away, or that
//! restarted and knows no leader yet, cannot unseat a healthy leader. A leader's own group
//! lease (openraft's) is not used for this, because quiescent groups exchange no messages.
//!
//! Safety never depends on any of this: liveness only decides *when* openraft's own elections
//! happen, and an election at the wrong time is only a wasted term.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_proto::v1::LivenessProbe;
use eddy_proto::v1::NodeHeartbeat;
use eddy_proto::v1::Wake;
use eddy_proto::v1::raft_client::RaftClient;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::Raft;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::InstantOf;
use prost::Message;
use tokio::sync::Notify;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;
use tracing::warn;

use crate::network::FailedSessions;
use crate::transport::Datagrams;
use crate::transport::Peers;
use crate::types::C;
use crate::types::GroupId;
use crate::types::NodeId;
use crate::types::SnapshotData;

/// How often a node probes each peer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of one wake-up call (see [`Liveness::run_wakes`]).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(400);
/// A peer that answered no probe sent in this long is judged down.
pub const DOWN_AFTER: Duration = Duration::from_millis(600);
/// A peer that has answered no probe sent in this long is suspected. A replica grants a Pre-Vote
/// against a leader it suspects: the candidate campaigns only once it has judged that leader down
/// itself, and the two nodes' judgements can be up to a probe round apart, so refusing until
/// this node judges the leader down too would cost the candidate a whole retry.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(300);
/// A node whose own runtime made no progress for this long stops answering probes: its threads
/// run, but its groups do not, and its peers must see it down (see [`Liveness::pulse`]).
pub const WEDGED_AFTER: Duration = Duration::from_secs(3);
/// A follower that knows no leader asks its peers to wake it and waits this long before it
/// campaigns itself.
pub const WAKE_GRACE: Duration = Duration::from_millis(1000);
/// How long the other replicas of a group being created wait for its preferred replica to
/// win the first election, while that replica's node is alive (see [`GroupWatch`]).
pub const FIRST_LEADER_GRACE: Duration = Duration::from_secs(5);
/// Delay between the turns of successive candidates (by rank) of one group.
pub const RANK_STEP: Duration = Duration::from_millis(250);
/// A leadership transfer that has not produced a new leader after this long is abandoned:
/// the followers elect (see `RaftService::transfer_leader`).
pub const TRANSFER_GRACE: Duration = Duration::from_secs(2);
/// How many heartbeats a leader sends a returning follower that does not answer (about 30 s
/// with the backoff) before it leaves it to the next write or the next time it comes up.
pub const RETURNED_ATTEMPTS_MAX: u32 = 16;
/// The longest pause between two campaigns of one group.
pub const RETRY_MAX: Duration = Duration::from_secs(4);
/// At most this many of a node's groups campaign at once. When a node that led a thousand groups
/// dies, a thousand simultaneous elections make every vote (an fsync on both sides) slower than
/// openraft's vote deadline (the election timeout, 400 ms for partitions); the failed elections
/// retry in higher terms and the storm feeds itself. In waves, each election completes in time.
/// (128 was still too many on a 2-core machine running three nodes of 3,000 partitions.)
pub const CAMPAIGNS_MAX: usize = 32;
/// A campaign holds its place among [`CAMPAIGNS_MAX`] until the group has a leader or this long
/// has passed (by then openraft's vote requests have timed out).
pub const CAMPAIGN_HOLD: Duration = Duration::from_millis(500);
/// How long after its group lost its leader a candidate defers to live candidates ranked ahead
/// of it that are busy winning other campaigns (see [`GroupWatch`]).
pub const DEFER_MAX: Duration = Duration::from_secs(3);
/// The largest probe datagram read; probes are a few dozen bytes.
const PROBE_BYTES_MAX: usize = 256;
/// Probe rounds remembered, to know when an answered probe was sent. An answer to an older
/// probe says nothing about the last [`DOWN_AFTER`] and is ignored.
const ROUNDS_KEPT: usize = (DOWN_AFTER.as_millis() / HEARTBEAT_INTERVAL.as_millis()) as usize;
/// A node whose clock is further than this from the cluster's (see
/// [`Liveness::cluster_clock_offset`]) says so in its log: CockroachDB's default maximum offset.
pub const CLOCK_OFFSET_WARN_MS: i64 = 500;

/// The wall clock a node's probes carry, in milliseconds since the Unix epoch: the one its
/// time-based retention reads.
pub type WallClock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// What this node currently believes about its peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LivenessView {
    /// Peers judged down.
    pub down: BTreeSet<NodeId>,
    /// How many times each peer came (back) up as seen from here: its first answer, an answer
    /// after it was judged down, or an answer from a new incarnation (a restart).
    pub ups: BTreeMap<NodeId, u64>,
    /// Groups whose leader, as this node knows it, said it does not know the group's leader
    /// (it restarted and lost its leadership): group → (that node, the term it led).
    pub disowned: BTreeMap<GroupId, (NodeId, u64)>,
    /// Replicas their nodes said are damaged (a wake with `damaged`) and have not said since
    /// that they run: (group, node). Such a replica leads nothing, in any term.
    pub damaged: BTreeSet<(GroupId, NodeId)>,
}

impl LivenessView {
    pub fn is_down(&self, node: NodeId) -> bool {
        self.down.contains(&node)
    }

    /// Whether `leader`, leading `group` in `term` as this node knows it, is gone: judged down,
    /// it said it no longer knows the group's leader, or its replica is damaged. (A state, not
    /// an event: a follower that hears of the damage before its own replica starts still
    /// campaigns once it does; seed 162.)
    pub fn leader_gone(&self, group: GroupId, leader: NodeId, term: u64) -> bool {
        self.is_down(leader)
            || self.disowned.get(&group) == Some(&(leader, term))
            || self.damaged.contains(&(group, leader))
    }
}

struct PeerState {
    addr: String,
    /// `addr` resolved; forgotten when the peer is judged down, so a peer that moved is found.
    resolved: Option<SocketAddr>,
    /// When the last answered probe was sent, or when this node last could not judge (start,
    /// own stall).
    last_ok: Instant,
    incarnation: Option<u64>,
    /// How far the peer's clock is ahead of this node's, in milliseconds, as measured by its
    /// last answer; forgotten when it is judged down.
    clock_offset: Option<i64>,
    /// A wake-up call to this peer is under way.
    waking: bool,
    sent: u64,
}

struct Inner {
    peers: BTreeMap<NodeId, PeerState>,
    /// Groups to name in the next wake-up call to each peer.
    wake: BTreeMap<NodeId, BTreeMap<GroupId, Wake>>,
    view: LivenessView,
    /// The last probe rounds: (round, when its probes were sent).
    rounds: VecDeque<(u64, Instant)>,
    /// The runtime's pulse as last seen, and since when it has not moved.
    pulse_seen: (u64, Instant),
    /// The runtime made no progress for [`WEDGED_AFTER`]: probes go unanswered.
    wedged: bool,
    /// This node's damaged replicas: the wake that says so, and the nodes to tell (see
    /// [`Liveness::report_damaged`]).
    own_damaged: BTreeMap<GroupId, (Wake, BTreeSet<NodeId>)>,
    /// This node's clock was last seen further than [`CLOCK_OFFSET_WARN_MS`] from the cluster's.
    clock_off: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct LivenessStats {
    /// Probes sent to each peer since start.
    pub heartbeats_sent: BTreeMap<NodeId, u64>,
    /// Campaigns started by [`GroupWatch`] since start.
    pub elections: u64,
    pub down: BTreeSet<NodeId>,
    /// How far each peer's clock is ahead of this node's, in milliseconds (last measured).
    pub clock_offsets: BTreeMap<NodeId, i64>,
}

/// The node's liveness tracker. See the module documentation.
pub struct Liveness {
    me: NodeId,
    incarnation: u64,
    wall: WallClock,
    inner: Mutex<Inner>,
    view: watch::Sender<LivenessView>,
    elections: AtomicU64,
    /// Advanced by [`Liveness::pulse`] on the node's runtime.
    pulse: AtomicU64,
    /// Places for campaigns under way (see [`CAMPAIGNS_MAX`]).
    campaigns: Arc<Semaphore>,
    /// Notified when one of this node's groups gains or loses its leadership here.
    leaders_changed: Notify,
    /// Groups whose replica here last granted a pre-vote to another candidate, and when.
    pre_votes: Mutex<BTreeMap<GroupId, Instant>>,
    /// When this node last granted a pre-vote to each other node, for any group.
    candidates: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Liveness {
    /// `incarnation` must differ on every start of this node; `wall` is the clock its probes
    /// carry.
    pub fn new(me: NodeId, incarnation: u64, wall: WallClock) -> Arc<Self> {
        Arc::new(Self {
            me,
            incarnation,
            wall,
            inner: Mutex::new(Inner {
                peers: BTreeMap::new(),
                wake: BTreeMap::new(),
                view: LivenessView::default(),
                rounds: VecDeque::new(),
                pulse_seen: (0, Instant::now()),
                wedged: false,
                own_damaged: BTreeMap::new(),
                clock_off: false,
            }),
            view: watch::Sender::new(LivenessView::default()),
            elections: AtomicU64::new(0),
            pulse: AtomicU64::new(0),
            campaigns: Arc::new(Semaphore::new(CAMPAIGNS_MAX)),
            leaders_changed: Notify::new(),
            pre_votes: Mutex::new(BTreeMap::new()),
            candidates: Mutex::new(BTreeMap::new()),
        })
    }

    /// Notes what a wake from `node` says of its replica of the wake's group: damaged (not
    /// running), or running (any other wake).
    pub fn note_replica(&self, node: NodeId, wake: &Wake) {
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        if wake.damaged {
            view.damaged.insert((wake.group_id, node));
        } else {
            view.damaged.remove(&(wake.group_id, node));
        }
        self.publish(&mut inner, view);
    }

    /// Whether `node` said its replica of `group` is damaged and has not said since that it
    /// runs: a leader does not count it in sync.
    pub fn replica_damaged(&self, group: GroupId, node: NodeId) -> bool {
        self.lock().view.damaged.contains(&(group, node))
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Notified (one stored wake-up, whoever waits next) when one of this node's groups gains
    /// or loses its leadership here, for loops that act on the groups a node leads.
    pub fn leaders_changed(&self) -> &Notify {
        &self.leaders_changed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<LivenessView> {
        self.view.subscribe()
    }

    pub fn view(&self) -> LivenessView {
        self.view.borrow().clone()
    }

    /// Whether `leader`, leading `group` in `term` as this node knows it, may be gone: judged
    /// down or disowned (see [`LivenessView::leader_gone`]), or silent for [`SUSPECT_AFTER`].
    pub fn leader_suspected(&self, group: GroupId, leader: NodeId, term: u64) -> bool {
        let inner = self.lock();
        inner.view.leader_gone(group, leader, term)
            || inner
                .peers
                .get(&leader)
                .is_some_and(|p| Instant::now().duration_since(p.last_ok) > SUSPECT_AFTER)
    }

    /// Whether `node` is this node or a member as this node's metadata shows it (see
    /// [`Liveness::set_members_and_gone`]).
    pub fn is_member(&self, node: NodeId) -> bool {
        node == self.me || self.lock().peers.contains_key(&node)
    }

    /// True unless `node` is judged down. This node is always alive; a node that is not a
    /// peer (yet) counts as alive, so nothing acts on a node it knows nothing about.
    pub fn is_alive(&self, node: NodeId) -> bool {
        !self.view.borrow().is_down(node)
    }

    /// Sets the peers to watch (node id → Raft address); this node is left out.
    pub fn set_members(&self, members: BTreeMap<NodeId, String>) {
        self.set_members_and_gone(members, BTreeSet::new());
    }

    /// [`Liveness::set_members`], and the nodes removed from the cluster: those count as down
    /// for good, so a group still led by one (its replica deleted, its machine switched off)
    /// elects a new leader instead of waiting for it.
    pub fn set_members_and_gone(&self, members: BTreeMap<NodeId, String>, gone: BTreeSet<NodeId>) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.peers.retain(|id, _| members.contains_key(id));
        for (id, addr) in members {
            if id == self.me {
                continue;
            }
            let p = inner.peers.entry(id).or_insert_with(|| PeerState {
                addr: addr.clone(),
                resolved: None,
                last_ok: now,
                incarnation: None,
                clock_offset: None,
                waking: false,
                sent: 0,
            });
            if p.addr != addr {
                p.addr = addr;
                p.resolved = None;
            }
        }
        let peers: BTreeSet<NodeId> = inner.peers.keys().copied().collect();
        inner.wake.retain(|id, _| peers.contains(id));
        let mut view = inner.view.clone();
        view.down.retain(|id| peers.contains(id));
        view.down.extend(gone.into_iter().filter(|id| *id != self.me && !peers.contains(id)));
        view.ups.retain(|id, _| peers.contains(id));
        self.publish(&mut inner, view);
    }

    /// Asks `peers` to send the group a heartbeat if they lead it (carried by the next
    /// wake-up call to each).
    pub fn request_wake(&self, wake: Wake, peers: impl IntoIterator<Item = NodeId>) {
        let mut inner = self.lock();
        for p in peers {
            if p != self.me && inner.peers.contains_key(&p) {
                inner.wake.entry(p).or_default().insert(wake.group_id, wake);
            }
        }
    }

    /// Tells `peers` that this node's replica of the wake's group is damaged, now and again
    /// whenever one of them restarts or comes back (a restarted peer has forgotten it), until
    /// [`Liveness::forget_damaged`]. Seed 162: a follower that restarted after the damage never
    /// heard of it, kept following the damaged leader, and refused every pre-vote for good.
    pub fn report_damaged(&self, wake: Wake, peers: BTreeSet<NodeId>) {
        let mut inner = self.lock();
        for p in &peers {
            if *p != self.me && inner.peers.contains_key(p) {
                inner.wake.entry(*p).or_default().insert(wake.group_id, wake);
            }
        }
        inner.own_damaged.insert(wake.group_id, (wake, peers));
    }

    /// This node's replica of `group` is no longer damaged (it was moved away).
    pub fn forget_damaged(&self, group: GroupId) {
        self.lock().own_damaged.remove(&group);
    }

    /// Notes that `node`, which this node's replica of `group` follows in `term`, asked to be
    /// woken: it knows no leader, so it does not lead the group any more.
    pub fn disown(&self, group: GroupId, node: NodeId, term: u64) {
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        view.disowned.insert(group, (node, term));
        self.publish(&mut inner, view);
    }

    /// Notes that this node's replica of `group` granted a pre-vote to another candidate: that
    /// candidate is about to ask for votes, and campaigning against it would split them (see
    /// [`GroupWatch`]).
    pub fn pre_vote_granted(&self, group: GroupId, candidate: NodeId) {
        let now = Instant::now();
        self.pre_votes.lock().unwrap_or_else(|e| e.into_inner()).insert(group, now);
        self.candidates.lock().unwrap_or_else(|e| e.into_inner()).insert(candidate, now);
    }

    /// When this node last granted `node` a pre-vote, for any group: `node` is working through
    /// campaigns, and winning them.
    fn candidate_granted(&self, node: NodeId) -> Option<Instant> {
        self.candidates.lock().unwrap_or_else(|e| e.into_inner()).get(&node).copied()
    }

    /// When this node's replica of `group` last granted a pre-vote to another candidate, if it
    /// did since the group last had a leader.
    fn last_pre_vote(&self, group: GroupId) -> Option<Instant> {
        self.pre_votes.lock().unwrap_or_else(|e| e.into_inner()).get(&group).copied()
    }

    fn forget_pre_vote(&self, group: GroupId) {
        self.pre_votes.lock().unwrap_or_else(|e| e.into_inner()).remove(&group);
    }

    /// Forgets what [`Liveness::disown`] noted for `group` (it has a leader again).
    pub fn forget_disowned(&self, group: GroupId) {
        let mut inner = self.lock();
        if inner.view.disowned.contains_key(&group) {
            let mut view = inner.view.clone();
            view.disowned.remove(&group);
            self.publish(&mut inner, view);
        }
    }

    pub fn stats(&self) -> LivenessStats {
        let inner = self.lock();
        LivenessStats {
            heartbeats_sent: inner.peers.iter().map(|(id, p)| (*id, p.sent)).collect(),
            elections: self.elections.load(Ordering::Relaxed),
            down: inner.view.down.clone(),
            clock_offsets: inner.peers.iter().filter_map(|(id, p)| Some((*id, p.clock_offset?))).collect(),
        }
    }

    /// How far this node's clock is behind the cluster's, in milliseconds (negative: ahead), or
    /// `None` when fewer than a majority of `members` (this node among them, if it is one) have
    /// a reading: this node's own (offset zero) and those of the peers judged up.
    ///
    /// The cluster's clock is the lower median of those readings. While fewer than half the
    /// readings come from clocks that run ahead, it is no later than some clock that does not:
    /// a node whose clock was already wrong when it started (a machine booted before NTP synced)
    /// cannot take its reading for the cluster's. Time-based retention reads it (in the node),
    /// as CockroachDB's nodes check their clocks against their peers' over its heartbeats.
    pub fn cluster_clock_offset(&self, members: &BTreeSet<NodeId>) -> Option<i64> {
        self.clock_offset_among(&self.lock(), members.iter().copied()).map(|(offset, _)| offset)
    }

    /// The lower median of the clock readings of `members` (see
    /// [`Liveness::cluster_clock_offset`]) and how many there are, if they are a majority.
    fn clock_offset_among(
        &self,
        inner: &Inner,
        members: impl Iterator<Item = NodeId>,
    ) -> Option<(i64, usize)> {
        let mut n = 0;
        let mut readings: Vec<i64> = members
            .inspect(|_| n += 1)
            .filter_map(|id| match inner.peers.get(&id) {
                _ if id == self.me => Some(0),
                Some(p) if !inner.view.is_down(id) => p.clock_offset,
                _ => None,
            })
            .collect();
        if readings.len() <= n / 2 {
            return None;
        }
        readings.sort_unstable();
        Some((readings[(readings.len() - 1) / 2], readings.len()))
    }

    fn publish(&self, inner: &mut Inner, view: LivenessView) {
        if view != inner.view {
            inner.view = view.clone();
            self.view.send_replace(view);
        }
    }

    /// The reply to a peer's wake-up call.
    pub fn answer(&self) -> NodeHeartbeat {
        NodeHeartbeat { from: self.me, incarnation: self.incarnation, wake: Vec::new() }
    }

    /// Advances the pulse every [`HEARTBEAT_INTERVAL`] until `cancel` fires. It runs on the
    /// node's runtime, while the probes may run on a thread of their own: a node whose runtime
    /// stops (a deadlock, a task that never yields) stops answering probes after
    /// [`WEDGED_AFTER`], while one that is merely busy keeps answering.
    pub async fn pulse(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Both arms only wait.
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => { self.pulse.fetch_add(1, Ordering::Relaxed); }
            }
        }
    }

    /// Probes every peer each [`HEARTBEAT_INTERVAL`] over `socket`, answers their probes, and
    /// judges them, until `cancel` fires. A peer that comes back gets new connections in
    /// `raft_peers`: the old ones may lead to a frozen, partitioned or restarted process, and
    /// would fail until keepalive noticed.
    pub async fn run_probes(
        self: Arc<Self>,
        socket: Arc<dyn Datagrams>,
        raft_peers: Arc<Peers>,
        cancel: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        let mut buf = [0u8; PROBE_BYTES_MAX];
        loop {
            tokio::select! {
                // Each arm only waits; `recv_from` is cancel-safe.
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {
                    let now = Instant::now();
                    // This node itself did not run for a while (a freeze, an overloaded machine):
                    // silence over that time says nothing about the peers.
                    let stalled = now.duration_since(last_tick) > HEARTBEAT_INTERVAL * 3;
                    last_tick = now;
                    let (round, due) = self.round(now, stalled);
                    for (id, addr, resolved) in due {
                        let to = match resolved {
                            Some(to) => to,
                            None => match socket.resolve(&addr).await {
                                Ok(to) => {
                                    self.resolved(id, &addr, to);
                                    to
                                }
                                Err(e) => {
                                    debug!(peer = id, "cannot resolve {addr}: {e}");
                                    continue;
                                }
                            },
                        };
                        let probe = LivenessProbe {
                            from: self.me, to: id, incarnation: self.incarnation, round, answer: false,
                            wall_ms: (self.wall)(),
                        };
                        if let Err(e) = socket.send_to(&probe.encode_to_vec(), to).await {
                            debug!(peer = id, "probe not sent: {e}");
                        }
                    }
                }
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => match LivenessProbe::decode(&buf[..n]) {
                        Ok(p) if p.to != self.me => debug!(?from, to = p.to, "a probe for another node"),
                        Ok(p) if p.answer => {
                            if self.record(p.from, p.incarnation, p.round, p.wall_ms) {
                                raft_peers.reconnect(p.from);
                            }
                        }
                        Ok(p) => {
                            if !self.lock().wedged {
                                let answer = LivenessProbe {
                                    from: self.me, to: p.from, incarnation: self.incarnation, round: p.round, answer: true,
                                    wall_ms: (self.wall)(),
                                };
                                if let Err(e) = socket.send_to(&answer.encode_to_vec(), from).await {
                                    debug!(peer = p.from, "probe answer not sent: {e}");
                                }
                            }
                        }
                        Err(e) => debug!(?from, "not a liveness probe: {e}"),
                    },
                    // E.g. an ICMP error for an earlier probe, reported on some platforms.
                    Err(e) => debug!("probe socket: {e}"),
                },
            }
        }
    }

    /// Judges every peer and starts a probe round: its number, and the peers to probe with
    /// their addresses (resolved, if known).
    fn round(&self, now: Instant, stalled: bool) -> (u64, Vec<(NodeId, String, Option<SocketAddr>)>) {
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        let pulse = self.pulse.load(Ordering::Relaxed);
        if stalled || pulse != inner.pulse_seen.0 {
            inner.pulse_seen = (pulse, now);
        }
        let wedged = now.duration_since(inner.pulse_seen.1) > WEDGED_AFTER;
        if wedged != inner.wedged {
            inner.wedged = wedged;
            if wedged {
                warn!(
                    node = self.me,
                    "this node's runtime made no progress for {WEDGED_AFTER:?}: not answering probes"
                );
            } else {
                info!(node = self.me, "this node's runtime runs again: answering probes");
            }
        }
        let round = inner.rounds.back().map_or(1, |(r, _)| r + 1);
        inner.rounds.push_back((round, now));
        while inner.rounds.len() > ROUNDS_KEPT {
            inner.rounds.pop_front();
        }
        let mut due = Vec::new();
        for (id, p) in inner.peers.iter_mut() {
            if stalled {
                p.last_ok = p.last_ok.max(now);
            }
            if now.duration_since(p.last_ok) > DOWN_AFTER && view.down.insert(*id) {
                p.resolved = None;
                p.clock_offset = None;
                info!(node = self.me, peer = id, "peer judged down: no probe answered for {DOWN_AFTER:?}");
            }
            p.sent += 1;
            due.push((*id, p.addr.clone(), p.resolved));
        }
        self.publish(&mut inner, view);
        (round, due)
    }

    fn resolved(&self, id: NodeId, addr: &str, to: SocketAddr) {
        if let Some(p) = self.lock().peers.get_mut(&id).filter(|p| p.addr == addr) {
            p.resolved = Some(to);
        }
    }

    /// Records an answer from `id` to the probe of `round`, sent when the peer's clock read
    /// `wall_ms`. Returns whether the peer came back: it answered after being judged down, or
    /// from a new incarnation.
    fn record(&self, id: NodeId, incarnation: u64, round: u64, wall_ms: i64) -> bool {
        let (received, my_wall) = (Instant::now(), (self.wall)());
        let mut inner = self.lock();
        let Some(sent) = inner.rounds.iter().find(|(r, _)| *r == round).map(|(_, at)| *at) else {
            return false;
        };
        let mut view = inner.view.clone();
        let Some(p) = inner.peers.get_mut(&id) else { return false };
        p.last_ok = p.last_ok.max(sent);
        // The peer read its clock between the probe's sending and the answer's arrival: take
        // the middle (the error is at most half the round trip).
        let half_trip = i64::try_from(received.duration_since(sent).as_millis() / 2).unwrap_or(i64::MAX);
        p.clock_offset = (wall_ms != 0).then(|| wall_ms.saturating_sub(my_wall.saturating_sub(half_trip)));
        let restarted = p.incarnation.is_some_and(|i| i != incarnation);
        let first = p.incarnation.is_none();
        p.incarnation = Some(incarnation);
        let was_down = view.down.remove(&id);
        if was_down || restarted || first {
            *view.ups.entry(id).or_default() += 1;
            if was_down || restarted {
                info!(node = self.me, peer = id, restarted, "peer is up");
            }
            let Inner { own_damaged, wake, .. } = &mut *inner;
            for (w, to) in own_damaged.values() {
                if to.contains(&id) {
                    wake.entry(id).or_default().insert(w.group_id, *w);
                }
            }
        }
        self.publish(&mut inner, view);
        self.judge_clock(&mut inner);
        was_down || restarted
    }

    /// Says in the log when this node's clock moves further than [`CLOCK_OFFSET_WARN_MS`] from
    /// the cluster's (as measured against the peers judged up), and when it comes back.
    fn judge_clock(&self, inner: &mut Inner) {
        let members = inner.peers.keys().copied().chain([self.me]);
        let Some((offset, readings)) = self.clock_offset_among(inner, members) else { return };
        let off = offset.abs() > CLOCK_OFFSET_WARN_MS;
        if off != inner.clock_off {
            inner.clock_off = off;
            if off {
                warn!(
                    node = self.me,
                    "this node's clock is {} ms {} the cluster's (the median of {} nodes' clocks): \
                     time-based retention reads the earlier of the two",
                    offset.abs(),
                    if offset < 0 { "ahead of" } else { "behind" },
                    readings
                );
            } else {
                info!(node = self.me, "this node's clock agrees with the cluster's again");
            }
        }
    }

    /// Sends each peer the wake-ups requested for it (see [`Liveness::request_wake`]), one call
    /// at a time per peer, over `peers` (connections of their own, so that bulk Raft traffic
    /// does not delay them), until `cancel` fires.
    pub async fn run_wakes(self: Arc<Self>, peers: Arc<Peers>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut calls = FuturesUnordered::new();
        loop {
            tokio::select! {
                // Each arm only waits or records; nothing is left half done by another winning.
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {
                    for (id, addr, wake) in self.take_wakes() {
                        let client = RaftClient::new(peers.channel(id, &addr));
                        let req = NodeHeartbeat { from: self.me, incarnation: self.incarnation, wake };
                        calls.push(send_wakes(client, id, req));
                    }
                }
                Some((id, failed)) = calls.next(), if !calls.is_empty() => self.wakes_done(id, failed),
            }
        }
    }

    /// The wake-ups to send now: per peer with some and no call under way.
    fn take_wakes(&self) -> Vec<(NodeId, String, Vec<Wake>)> {
        let mut inner = self.lock();
        let Inner { peers, wake, view, .. } = &mut *inner;
        let mut due = Vec::new();
        for (id, p) in peers.iter_mut() {
            // A peer judged down keeps its wake-ups until it is up.
            if p.waking || view.is_down(*id) {
                continue;
            }
            if let Some(groups) = wake.remove(id).filter(|g| !g.is_empty()) {
                p.waking = true;
                due.push((*id, p.addr.clone(), groups.into_values().collect()));
            }
        }
        due
    }

    /// A wake-up call ended; the wake-ups of a failed one are sent again, once the peer is up
    /// if it is down. (A leader's side of [`GroupWatch`] heartbeats a returning follower, but
    /// a wake saying that its sender lost a leadership has no other way to the followers: a
    /// follower that never hears it waits for that leader for good.)
    fn wakes_done(&self, id: NodeId, failed: Option<Vec<Wake>>) {
        let mut inner = self.lock();
        let Some(p) = inner.peers.get_mut(&id) else { return };
        p.waking = false;
        if let Some(failed) = failed {
            let queued = inner.wake.entry(id).or_default();
            for w in failed {
                queued.entry(w.group_id).or_insert(w);
            }
        }
    }
}

/// One wake-up call; returns the wake-ups if it failed.
async fn send_wakes(
    mut client: RaftClient<tonic::transport::Channel>,
    id: NodeId,
    req: NodeHeartbeat,
) -> (NodeId, Option<Vec<Wake>>) {
    let mut request = tonic::Request::new(req.clone());
    request.set_timeout(HEARTBEAT_TIMEOUT);
    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(request)).await {
        Ok(Ok(_)) => (id, None),
        Ok(Err(status)) => {
            debug!(peer = id, "wake-up call failed: {}", status.message());
            (id, Some(req.wake))
        }
        Err(_) => (id, Some(req.wake)),
    }
}

/// Asks `raft`, if it leads its group, to hand the leadership to `to`, and repeats the request
/// every [`TRANSFER_GRACE`] for as long as it still leads in the same term.
///
/// openraft sends a transfer request to the voters only once, and from then on the leader
/// refuses writes (and sends no heartbeats) until another leader takes over; it cannot cancel a
/// transfer. In a group without election timers nothing else would end a transfer whose
/// requests were lost (the leader cut off from its followers when it started): the group would
/// refuse writes for good. A repeated request reaches the followers once the network lets it.
///
/// Nor would anything end a transfer to a target that died after it started: the other
/// followers elect once [`TRANSFER_GRACE`] has passed (see `RaftService::transfer_leader`), but
/// only one whose log is as long as the leader's can win, and the leader has entries no
/// follower has whenever a write was under way. So a repeated request goes to the live voter
/// furthest along instead (see [`transfer_target`]), which the leader itself brings up to date.
/// Neither ever picks a replica its node reported damaged (simulator seed 51: a disk-full
/// hand-over waited for good on a replica that would never start).
pub async fn transfer_leadership<SM>(
    raft: &Raft<C, SM>,
    group: GroupId,
    to: NodeId,
    liveness: &Arc<Liveness>,
) -> Result<(), openraft::errors::Fatal<C>>
where
    SM: RaftStateMachine<C>,
{
    let m = raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader || m.current_leader == Some(to) {
        return Ok(());
    }
    raft.trigger().transfer_leader(to).await?;
    let (raft, vote, liveness) = (raft.clone(), m.vote, liveness.clone());
    tokio::spawn(async move {
        let mut to = to;
        loop {
            tokio::time::sleep(TRANSFER_GRACE).await;
            let m = raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader || m.vote != vote {
                return;
            }
            let next = transfer_target(&m, group, to, &liveness.view());
            if next != to {
                info!(id = m.id, from = to, to = next, vote = %vote, "leadership transfer not done yet: handing over to another voter");
                to = next;
            } else {
                debug!(id = m.id, to, vote = %vote, "leadership transfer not done yet: asking again");
            }
            if raft.trigger().transfer_leader(to).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The voter a leader whose transfer to `to` has not completed asks next: `to` while its node
/// is not judged down and its replica of `group` not damaged (a live target catches up: the leader goes
/// on replicating to it), else the live, undamaged voter other than the leader whose replicated
/// log is furthest along (lowest id first among equals).
pub fn transfer_target(m: &crate::RaftMetrics, group: GroupId, to: NodeId, view: &LivenessView) -> NodeId {
    let matched = |n: NodeId| {
        m.replication.as_ref().and_then(|r| r.get(&n).copied().flatten()).map_or(0, |l| l.index + 1)
    };
    let usable = |n: NodeId| !view.is_down(n) && !view.damaged.contains(&(group, n));
    let best = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|n| *n != m.id && usable(*n))
        .max_by_key(|n| (matched(*n), std::cmp::Reverse(*n)));
    match best {
        Some(b) if !usable(to) => b,
        _ => to,
    }
}

/// A number in [0, 1) that differs between nodes, groups and attempts, the same on every run
/// (the simulator replays it): splitmix64 of the three.
fn spread(group: GroupId, node: NodeId, attempt: u32) -> f64 {
    let mut z = group
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(node.rotate_left(32))
        .wrapping_add(u64::from(attempt).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// This node's turn among a group's candidates: the live voters (other than `exclude`), in an
/// order rotated by the group id so that the first candidates spread over the nodes.
pub fn campaign_rank(
    me: NodeId,
    group: GroupId,
    voters: &BTreeSet<NodeId>,
    view: &LivenessView,
    exclude: Option<NodeId>,
) -> Option<usize> {
    let live: Vec<NodeId> =
        voters.iter().copied().filter(|n| Some(*n) != exclude && (*n == me || !view.is_down(*n))).collect();
    if live.is_empty() {
        return None;
    }
    let shift = (group % live.len() as u64) as usize;
    let pos = live.iter().position(|n| *n == me)?;
    Some((pos + live.len() - shift) % live.len())
}

/// Drives one group's elections and wake-ups from node liveness. See the module documentation.
pub struct GroupWatch<SM>
where
    SM: RaftStateMachine<C, SnapshotData = SnapshotData>,
{
    pub group: GroupId,
    pub raft: Raft<C, SM>,
    pub liveness: Arc<Liveness>,
    /// The replica that should win the group's first election (the partition's preferred
    /// leader, which campaigns as soon as it has created the group). The others give it
    /// [`FIRST_LEADER_GRACE`] instead of [`WAKE_GRACE`] while its node is alive.
    pub first_leader: Option<NodeId>,
    /// Followers this group's replication sessions failed to (from its `GroupNetwork`).
    pub failed_sessions: Arc<FailedSessions>,
}

impl<SM> GroupWatch<SM>
where
    SM: RaftStateMachine<C, SnapshotData = SnapshotData>,
{
    pub async fn run(self, cancel: CancellationToken) {
        let me = self.liveness.me();
        let mut server = self.raft.server_metrics();
        let mut live = self.liveness.subscribe();
        let mut seen_ups = live.borrow().ups.clone();
        // While the group has no live leader: since when, and how many campaigns this node ran.
        let mut orphan: Option<(Instant, u32)> = None;
        // A replica that just opened (a restart, or a new replica) may lack entries or the
        // commit point, and whatever the leader sent while it was not open yet was lost: it asks
        // once to be brought up to date, as soon as it can be.
        let mut opened = true;
        // While leading: followers that must answer a heartbeat sent at or after the instant
        // noted (they came back, or a replication session to them failed), and the last such
        // heartbeat (when, how many so far).
        let mut returned: BTreeMap<NodeId, InstantOf<C>> = BTreeMap::new();
        let mut returned_attempt: Option<(Instant, u32)> = None;
        // This group's campaign under way, holding one of the node's places (CAMPAIGNS_MAX).
        let mut campaign: Option<(OwnedSemaphorePermit, Instant)> = None;
        // The vote as last seen: granting one to another candidate restarts the wait (Raft's
        // election timer reset), so the next in rank does not run against a campaign under way.
        let mut seen_vote = None;
        let mut leading = false;
        loop {
            let m = server.borrow_watched().clone();
            let view = live.borrow_and_update().clone();
            if leading != (m.state == ServerState::Leader) {
                leading = !leading;
                self.liveness.leaders_changed.notify_one();
                if leading && let Some((since, attempts)) = orphan {
                    info!(
                        node = me,
                        group = self.group,
                        term = m.vote.leader_id().term,
                        attempts,
                        since_campaign_ms = since.elapsed().as_millis() as u64,
                        "won the election"
                    );
                }
            }
            // A leader judged gone does not decide anything: openraft keeps naming it while this
            // replica pre-votes, and counting it let every campaign give its place back at once,
            // so a dead node's thousand groups all campaigned together and each took as long as
            // the slowest.
            let decided = m.state == ServerState::Leader
                || (m.state != ServerState::Candidate
                    && m.current_leader.is_some_and(|l| {
                        l != me && !view.leader_gone(self.group, l, m.vote.leader_id().term)
                    }));
            if campaign.as_ref().is_some_and(|(_, at)| decided || Instant::now() >= *at + CAMPAIGN_HOLD) {
                campaign = None;
            }
            if decided {
                self.liveness.forget_pre_vote(self.group);
            }
            let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
            let mut next: Option<Instant> = None;
            debug!(node = me, group = self.group, state = ?m.state, leader = ?m.current_leader, vote = %m.vote, ?voters, down = ?view.down, "group watch");
            if view
                .disowned
                .get(&self.group)
                .is_some_and(|(n, t)| m.current_leader != Some(*n) || m.vote.leader_id().term != *t)
            {
                // A leader was elected since: what was noted no longer applies.
                self.liveness.forget_disowned(self.group);
            }
            let failed = self.failed_sessions.take();
            if m.state != ServerState::Leader {
                returned.clear();
            }
            if m.state == ServerState::Leader {
                orphan = None;
                let members: BTreeSet<NodeId> =
                    m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
                // A follower whose node came back (a restart, a healed partition, a thaw), or to
                // which a replication session failed (openraft drops the commit point that
                // session carried), may lack the commit point or entries, and only a message
                // from this leader brings them: heartbeat it until it has answered one sent
                // since, or is down again.
                let acked = || self.raft.metrics().borrow_watched().heartbeat.clone().unwrap_or_default();
                // openraft's instant (the heartbeat answers are timed with it).
                let now = <InstantOf<C> as openraft::Instant>::now();
                let mut added = false;
                for n in failed.into_iter().filter(|n| *n != me && members.contains(n)) {
                    added |= returned.insert(n, now).is_none();
                }
                let back: Vec<NodeId> = members
                    .iter()
                    .copied()
                    .filter(|n| {
                        *n != me
                            && view.ups.get(n).copied().unwrap_or(0) > seen_ups.get(n).copied().unwrap_or(0)
                    })
                    .collect();
                if !back.is_empty() {
                    // Replication to a peer judged down waits out a long backoff
                    // (`network::DOWN_BACKOFF`); it is back, so the wait ends.
                    if self.raft.trigger().reset_backoff(back.iter().copied()).await.is_err() {
                        break;
                    }
                    for n in back {
                        returned.insert(n, now);
                    }
                    added = true;
                }
                if added {
                    returned_attempt = None;
                }
                if !returned.is_empty() {
                    let acked = acked();
                    returned.retain(|n, since| {
                        members.contains(n)
                            && !view.is_down(*n)
                            && acked.get(n).copied().flatten().is_none_or(|a| *a < *since)
                    });
                }
                if !returned.is_empty() {
                    let now = Instant::now();
                    let due = returned_attempt.is_none_or(|(at, n)| now >= at + RANK_STEP * n.min(16));
                    if due && returned_attempt.is_some_and(|(_, n)| n >= RETURNED_ATTEMPTS_MAX) {
                        debug!(node = me, group = self.group, followers = ?returned.keys().collect::<Vec<_>>(), "returned followers never answered: giving up");
                        returned.clear();
                        returned_attempt = None;
                    } else if due {
                        let n = returned_attempt.map_or(1, |(_, n)| n + 1);
                        debug!(node = me, group = self.group, followers = ?returned.keys().collect::<Vec<_>>(), attempt = n, "heartbeating returned followers");
                        let _ = self.raft.trigger().heartbeat().await;
                        returned_attempt = Some((now, n));
                    }
                    if let Some((at, n)) = returned_attempt {
                        next = Some(at + RANK_STEP * n.min(16));
                    }
                }
            } else if voters.contains(&me)
                && m.current_leader
                    // A leader that restarted finds its own committed vote: it does not lead.
                    .filter(|l| *l != me)
                    .is_none_or(|l| view.leader_gone(self.group, l, m.vote.leader_id().term))
            {
                opened = false;
                let now = Instant::now();
                let dead_leader = m.current_leader.filter(|l| *l != me);
                if orphan.is_none() && dead_leader.is_none() {
                    let term = m.vote.leader_id().term;
                    let leader_lost = m.vote.is_committed() && m.vote.leader_id().voted_for == me;
                    let wake = Wake { group_id: self.group, term, leader_lost, damaged: false };
                    self.liveness.request_wake(wake, voters.iter().copied());
                }
                let voted_other = !m.vote.is_committed()
                    && m.vote.leader_id().voted_for != me
                    && seen_vote.is_some_and(|v| v != m.vote);
                if let Some((since, _)) = orphan.as_mut().filter(|_| voted_other) {
                    debug!(node = me, group = self.group, vote = %m.vote, "voted for another candidate: waiting again");
                    *since = now;
                }
                let (since, attempts) = *orphan.get_or_insert((now, 0));
                let rank = campaign_rank(me, self.group, &voters, &view, dead_leader).unwrap_or(0) as u32;
                // A group whose log holds only its initial membership never had a leader: it
                // is being created. Its preferred replica campaigns as soon as it has created it
                // (and again here, soon, if its peers had not created theirs yet); the others
                // give it time, since on nodes creating a thousand groups each the peers are
                // seconds apart, and running against it only elects a leader that balancing
                // moves again later (at 3,000 partitions a third of all groups were, and the
                // cluster stayed busy with transfers for 20 s after it was healthy).
                let pristine = self.raft.metrics().borrow_watched().last_log_index.is_none_or(|i| i == 0);
                let first = self.first_leader.filter(|p| pristine && voters.contains(p) && !view.is_down(*p));
                let rank = if first == Some(me) { 0 } else { rank };
                let wait = match attempts {
                    0 if first == Some(me) => RANK_STEP,
                    0 if first.is_some() => FIRST_LEADER_GRACE,
                    0 if dead_leader.is_none() => WAKE_GRACE,
                    0 => Duration::ZERO,
                    // Failed campaigns retry after a wait that differs between the candidates
                    // (Raft's randomized election timeout): when several ran at once and split
                    // the votes, they do not meet again.
                    n => {
                        let base = (RANK_STEP * 2 * n.min(16)).min(RETRY_MAX);
                        base + base.mul_f64(spread(self.group, me, n) / 2.0)
                    }
                };
                let mut at = since + wait + RANK_STEP * rank;
                // A candidate this replica granted a pre-vote to is asking for votes now: it
                // gets the time a campaign holds before this one runs against it. (Under load a
                // campaign takes longer than the step between ranks, and candidates that ran at
                // once split the votes of a whole group; at 3,000 partitions elections failed
                // for a minute that way.)
                if let Some(granted) = self.liveness.last_pre_vote(self.group) {
                    at = at.max(granted + CAMPAIGN_HOLD);
                }
                // A candidate ranked ahead that this node granted a pre-vote for any group
                // lately is working through its own queue of campaigns (at most CAMPAIGNS_MAX at
                // once), and reaches this group after a while: it keeps its turn, for up to
                // DEFER_MAX. (After a node leading 1,000 of 3,000 partitions died, the fixed step
                // between ranks let the next in line run against the first, and 40% of the
                // first campaigns failed.) A candidate ahead that this node refuses, or that
                // stays silent, is not waited for.
                if rank > 0 && now < since + DEFER_MAX {
                    for n in
                        voters.iter().filter(|n| **n != me && Some(**n) != dead_leader && !view.is_down(**n))
                    {
                        let ahead = campaign_rank(*n, self.group, &voters, &view, dead_leader)
                            .is_some_and(|r| (r as u32) < rank);
                        if ahead && let Some(t) = self.liveness.candidate_granted(*n) {
                            at = at.max((t + CAMPAIGN_HOLD).min(since + DEFER_MAX));
                        }
                    }
                }
                if now >= at && campaign.is_none() {
                    let permit = tokio::select! {
                        // Each arm only waits; a change means the campaign is looked at again.
                        _ = cancel.cancelled() => break,
                        p = self.liveness.campaigns.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        r = server.changed() => if r.is_err() { break } else { continue },
                        r = live.changed() => if r.is_err() { break } else { continue },
                    };
                    let now = Instant::now();
                    // Waiting for a place can take a while: a candidate may have asked since.
                    if self.liveness.last_pre_vote(self.group).is_some_and(|t| now < t + CAMPAIGN_HOLD) {
                        drop(permit);
                        continue;
                    }
                    info!(node = me, group = self.group, rank, attempts, leader = ?dead_leader, term = m.vote.leader_id().term, disowned = ?view.disowned.get(&self.group), "no live leader: campaigning");
                    self.liveness.elections.fetch_add(1, Ordering::Relaxed);
                    if self.raft.trigger().elect(true).await.is_err() {
                        break;
                    }
                    campaign = Some((permit, now));
                    orphan = Some((now, attempts + 1));
                    seen_ups = view.ups;
                    continue;
                }
                // With a campaign under way, the next one is due when its place is given back.
                next = Some(campaign.as_ref().map_or(at, |(_, started)| at.max(*started + CAMPAIGN_HOLD)));
            } else {
                orphan = None;
                if opened {
                    let term = m.vote.leader_id().term;
                    let members = m.membership_config.membership().nodes().map(|(id, _)| *id);
                    self.liveness.request_wake(
                        Wake { group_id: self.group, term, leader_lost: false, damaged: false },
                        members,
                    );
                }
            }
            opened = false;
            seen_ups = view.ups;
            seen_vote = Some(m.vote);
            if let Some((_, at)) = &campaign {
                let release = *at + CAMPAIGN_HOLD;
                next = Some(next.map_or(release, |n| n.min(release)));
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Each arm only waits.
                _ = cancel.cancelled() => break,
                r = server.changed() => if r.is_err() { break },
                r = live.changed() => if r.is_err() { break },
                () = self.failed_sessions.marked() => {}
                () = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use futures::future::BoxFuture;
    use tokio::sync::mpsc;

    use super::*;
    use crate::transport::TcpConnector;

    /// A datagram and its sender.
    type Delivery = (Vec<u8>, SocketAddr);

    /// An in-memory datagram network.
    #[derive(Default)]
    struct Hub {
        sockets: Mutex<BTreeMap<SocketAddr, mpsc::UnboundedSender<Delivery>>>,
    }

    struct MemSocket {
        addr: SocketAddr,
        hub: Arc<Hub>,
        rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    }

    impl Hub {
        fn bind(self: &Arc<Self>, addr: &str) -> Arc<MemSocket> {
            let addr: SocketAddr = addr.parse().unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            self.sockets.lock().unwrap().insert(addr, tx);
            Arc::new(MemSocket { addr, hub: self.clone(), rx: tokio::sync::Mutex::new(rx) })
        }
    }

    impl Datagrams for MemSocket {
        fn resolve<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<SocketAddr>> {
            Box::pin(async move { addr.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e)) })
        }

        fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<()>> {
            // Like UDP: a datagram to an address nobody listens on is lost.
            if let Some(tx) = self.hub.sockets.lock().unwrap().get(&to) {
                let _ = tx.send((buf.to_vec(), self.addr));
            }
            Box::pin(async { Ok(()) })
        }

        fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
            Box::pin(async move {
                let (data, from) = self.rx.lock().await.recv().await.ok_or(io::ErrorKind::BrokenPipe)?;
                buf[..data.len()].copy_from_slice(&data);
                Ok((data.len(), from))
            })
        }
    }

    const ADDRS: [&str; 2] = ["127.0.0.1:1", "127.0.0.1:2"];

    /// A wall clock that reads `ahead_ms` past the true time (of the paused test runtime).
    fn wall(ahead_ms: i64) -> WallClock {
        let start = Instant::now();
        Arc::new(move || 1_800_000_000_000 + ahead_ms + start.elapsed().as_millis() as i64)
    }

    /// One node's probe loop (and, if `pulse`, its runtime's pulse) on the hub.
    fn start(
        hub: &Arc<Hub>,
        me: NodeId,
        incarnation: u64,
        pulse: bool,
    ) -> (Arc<Liveness>, CancellationToken) {
        start_with_clock(hub, me, incarnation, pulse, wall(0))
    }

    fn start_with_clock(
        hub: &Arc<Hub>,
        me: NodeId,
        incarnation: u64,
        pulse: bool,
        wall: WallClock,
    ) -> (Arc<Liveness>, CancellationToken) {
        let liveness = Liveness::new(me, incarnation, wall);
        liveness.set_members((1..=2).map(|id| (id, ADDRS[id as usize - 1].to_owned())).collect());
        let cancel = CancellationToken::new();
        let socket = hub.bind(ADDRS[me as usize - 1]);
        let peers = Arc::new(Peers::new(Arc::new(TcpConnector)));
        tokio::spawn(liveness.clone().run_probes(socket, peers, cancel.clone()));
        if pulse {
            tokio::spawn(liveness.clone().pulse(cancel.clone()));
        }
        (liveness, cancel)
    }

    /// Waits (in paused time) until `liveness`'s view satisfies `f`; returns how long it took.
    async fn until(liveness: &Liveness, what: &str, f: impl Fn(&LivenessView) -> bool) -> Duration {
        let start = Instant::now();
        let mut rx = liveness.subscribe();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| f(v)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap();
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn probes_judge_a_dead_peer_down_and_its_restart_up() {
        let hub = Arc::new(Hub::default());
        let (one, _c1) = start(&hub, 1, 11, true);
        let (_two, c2) = start(&hub, 2, 21, true);
        until(&one, "node 2's first answer", |v| v.ups.get(&2) == Some(&1)).await;
        assert!(one.is_alive(2));

        c2.cancel();
        hub.sockets.lock().unwrap().remove(&ADDRS[1].parse().unwrap());
        let took = until(&one, "node 2 judged down", |v| v.is_down(2)).await;
        assert!(
            took >= DOWN_AFTER - HEARTBEAT_INTERVAL && took <= DOWN_AFTER + HEARTBEAT_INTERVAL * 2,
            "{took:?}"
        );

        // A new incarnation at the same address counts as the peer coming (back) up.
        let (_two, _c2) = start(&hub, 2, 22, true);
        let took = until(&one, "node 2 up again", |v| !v.is_down(2) && v.ups.get(&2) == Some(&2)).await;
        assert!(took <= HEARTBEAT_INTERVAL * 2, "{took:?}");
    }

    /// A node whose clock is ten hours ahead learns it from its peer's answers; neither takes
    /// a clock for the cluster's without readings from a majority of the members.
    #[tokio::test(start_paused = true)]
    async fn probes_measure_how_far_a_peer_clock_is() {
        const AHEAD: i64 = 10 * 3_600_000;
        let hub = Arc::new(Hub::default());
        let both: BTreeSet<NodeId> = [1, 2].into();
        let (one, _c1) = start_with_clock(&hub, 1, 11, true, wall(AHEAD));
        assert_eq!(one.cluster_clock_offset(&both), None, "no reading from node 2 yet");
        assert_eq!(one.cluster_clock_offset(&[1].into()), Some(0), "a cluster of one reads its own clock");
        let (two, _c2) = start(&hub, 2, 21, true);
        until(&one, "node 2's first answer", |v| v.ups.get(&2) == Some(&1)).await;
        until(&two, "node 1's first answer", |v| v.ups.get(&1) == Some(&1)).await;
        tokio::time::sleep(HEARTBEAT_INTERVAL * 2).await;
        let ahead = one.cluster_clock_offset(&both).expect("a reading from both members");
        assert!((ahead + AHEAD).abs() <= 50, "node 1 is {AHEAD} ms ahead, measured {ahead}");
        assert_eq!(two.cluster_clock_offset(&both), Some(0), "node 2 keeps its own, the earlier, clock");
        assert!((one.stats().clock_offsets[&2] + AHEAD).abs() <= 50);
        // Three members, one reading: no majority.
        assert_eq!(one.cluster_clock_offset(&[1, 3, 4].into()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_runtime_makes_no_progress_stops_answering() {
        let hub = Arc::new(Hub::default());
        let (one, _c1) = start(&hub, 1, 11, true);
        // Node 2's probe loop runs, but nothing advances its pulse: its runtime is wedged.
        let (two, _c2) = start(&hub, 2, 21, false);
        until(&one, "node 2's first answer", |v| v.ups.get(&2) == Some(&1)).await;
        let took = until(&one, "node 2 judged down", |v| v.is_down(2)).await;
        assert!(took >= WEDGED_AFTER - DOWN_AFTER, "judged down after {took:?}, before the wedge showed");
        // The wedged node itself still hears its peer.
        assert!(two.is_alive(1) && two.view().ups.get(&1) == Some(&1));

        // Its runtime runs again: it answers again.
        tokio::spawn(two.clone().pulse(CancellationToken::new()));
        until(&one, "node 2 up again", |v| !v.is_down(2)).await;
    }

    /// A node removed from the cluster is down for good: a group it still led (its replica
    /// deleted by a decommission, its machine switched off) elects another leader. Before, a
    /// node that was no longer a peer counted as alive, and such a group never elected.
    #[test]
    fn a_removed_node_counts_as_down() {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let l = Liveness::new(1, 11, wall(0));
            l.set_members([(2, ADDRS[1].to_owned()), (3, "127.0.0.1:9".to_owned())].into());
            assert!(!l.view().leader_gone(7, 3, 2), "a member is alive until judged down");
            l.set_members_and_gone([(2, ADDRS[1].to_owned())].into(), [3, 1].into());
            assert!(l.view().leader_gone(7, 3, 2), "a removed leader is gone");
            assert!(!l.is_alive(3));
            assert!(l.is_alive(1), "this node never counts as down");
            assert!(l.is_alive(9), "a node it knows nothing about counts as alive");
        });
    }

    /// A wake saying that its sender lost a leadership is the only way its followers learn it
    /// (simulator seed 182): one that cannot be sent while the peer is down is sent once it is
    /// up, and one whose call failed is kept for it.
    #[test]
    fn a_wake_to_a_peer_that_is_down_is_sent_once_it_is_up() {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let l = Liveness::new(1, 11, wall(0));
            l.set_members([(2, ADDRS[1].to_owned())].into());
            let set_down = |down: bool| {
                let mut inner = l.lock();
                let mut view = inner.view.clone();
                if down {
                    view.down.insert(2);
                } else {
                    view.down.remove(&2);
                }
                l.publish(&mut inner, view);
            };
            let wake = Wake { group_id: 7, term: 3, leader_lost: true, damaged: false };
            set_down(true);
            l.request_wake(wake, [2]);
            assert!(l.take_wakes().is_empty(), "nothing is sent to a peer judged down");
            set_down(false);
            let due = l.take_wakes();
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].2, vec![wake]);
            // The call fails, and the peer is judged down meanwhile: the wake waits for it.
            set_down(true);
            l.wakes_done(2, Some(due[0].2.clone()));
            assert!(l.take_wakes().is_empty());
            set_down(false);
            assert_eq!(l.take_wakes().first().map(|d| d.2.clone()), Some(vec![wake]));
        });
    }

    #[test]
    fn answers_to_forgotten_rounds_are_ignored() {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let l = Liveness::new(1, 11, wall(0));
            l.set_members([(2, ADDRS[1].to_owned())].into());
            let (first, _) = l.round(Instant::now(), false);
            for _ in 0..=ROUNDS_KEPT {
                tokio::time::advance(HEARTBEAT_INTERVAL).await;
                l.round(Instant::now(), false);
            }
            assert!(l.view().is_down(2));
            assert!(!l.record(2, 21, first, 0), "an answer to a probe sent more than DOWN_AFTER ago");
            assert!(l.view().is_down(2));
            let (last, _) = l.round(Instant::now(), false);
            assert!(l.record(2, 21, last, 0));
            assert!(!l.view().is_down(2));
        });
    }

    /// Leader 1's metrics: voters 1, 2, 3, and the index each follower has matched.
    fn leader_metrics(matched: &[(NodeId, Option<u64>)]) -> crate::RaftMetrics {
        let mut m = crate::RaftMetrics::new_initial(1);
        let membership = openraft::Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3])], []);
        m.membership_config = Arc::new(openraft::StoredMembership::new(None, membership));
        m.replication = Some(matched.iter().map(|(n, i)| (*n, i.map(|i| crate::log_id(1, i)))).collect());
        m
    }

    #[test]
    fn a_stuck_transfer_moves_to_the_live_voter_furthest_along() {
        let alive = LivenessView::default();
        let three_down = LivenessView { down: BTreeSet::from([3]), ..Default::default() };
        // The target is alive: ask it again.
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(9)), (3, Some(9))]), 7, 3, &alive), 3);
        // The target died: the other live voter, even behind (the leader brings it up to date).
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(4)), (3, Some(9))]), 7, 3, &three_down), 2);
        assert_eq!(transfer_target(&leader_metrics(&[(2, None), (3, Some(9))]), 7, 3, &three_down), 2);
        // The target is alive but behind another voter: it stays (it catches up).
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(9)), (3, Some(4))]), 7, 3, &alive), 3);
        // Among the others, the lowest id first when equally far along.
        let one_leads = LivenessView { down: BTreeSet::from([4]), ..Default::default() };
        let mut m = leader_metrics(&[(2, Some(9)), (3, Some(9)), (4, Some(9))]);
        m.membership_config = Arc::new(openraft::StoredMembership::new(
            None,
            openraft::Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3, 4])], []),
        ));
        assert_eq!(transfer_target(&m, 7, 4, &one_leads), 2);
        // Nobody else alive: the target stays (the group has no quorum anyway).
        let both_down = LivenessView { down: BTreeSet::from([2, 3]), ..Default::default() };
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(9)), (3, Some(9))]), 7, 3, &both_down), 3);
        // The target's replica is damaged (it will never start): the other voter, even behind.
        let three_damaged = LivenessView { damaged: BTreeSet::from([(7, 3)]), ..Default::default() };
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(4)), (3, Some(9))]), 7, 3, &three_damaged), 2);
        // Damage is per group: node 3's replica of another group is no reason to skip it.
        assert_eq!(transfer_target(&leader_metrics(&[(2, Some(4)), (3, Some(9))]), 8, 3, &three_damaged), 3);
    }

    #[test]
    fn ranks_rotate_with_the_group_and_skip_the_dead() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let view = LivenessView::default();
        let first = |g| (1..=3).find(|n| campaign_rank(*n, g, &voters, &view, None) == Some(0));
        assert_eq!([first(0), first(1), first(2), first(3)], [Some(1), Some(2), Some(3), Some(1)]);
        // Node 1 led and is down: 2 and 3 share ranks 0 and 1.
        let view = LivenessView { down: [1].into(), ..Default::default() };
        let ranks: Vec<_> = [2, 3].iter().map(|n| campaign_rank(*n, 5, &voters, &view, Some(1))).collect();
        assert_eq!(ranks.iter().flatten().copied().collect::<BTreeSet<_>>(), BTreeSet::from([0, 1]));
        assert_eq!(campaign_rank(4, 5, &voters, &view, Some(1)), None, "not a voter");
    }
}
