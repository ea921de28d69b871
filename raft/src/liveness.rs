//! Node liveness, and elections driven by it: what lets thousands of partition groups sit idle
//! at no cost.
//!
//! Partition groups run with openraft's ticker off (`enable_tick = false`): an idle group has no
//! timer, sends no heartbeat, and never times out. Liveness is judged once per *node* instead:
//! every node sends one small [`NodeHeartbeat`] to each peer every [`HEARTBEAT_INTERVAL`], and a
//! peer that has not answered for [`DOWN_AFTER`] is judged down. The cost grows with the number
//! of nodes, not of groups (the approach of CockroachDB's store liveness and of Redpanda's
//! per-node heartbeat manager; openraft's tick, heartbeat and election can all be driven from
//! outside, which is what this module does).
//!
//! Each partition group has a [`GroupWatch`] task that sleeps on two watches, the group's server
//! state (leader, vote, membership) and the [`LivenessView`], and so wakes only when one of them
//! changes:
//! - a follower whose leader is judged down campaigns at once, one voter at a time by a rank
//!   derived from the group id (no split votes when a thousand groups fail over together), with
//!   Pre-Vote, retrying with backoff until some leader is known;
//! - a follower that knows no leader (after its own restart, or when a leader changed while it
//!   was away) first asks its peers to wake it (`wake` in the next heartbeat: the peer leading
//!   the group sends it a heartbeat at once), and campaigns only after [`WAKE_GRACE`];
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
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_proto::v1::NodeHeartbeat;
use eddy_proto::v1::Wake;
use eddy_proto::v1::raft_client::RaftClient;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::Raft;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::storage::RaftStateMachine;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;

use crate::transport::Peers;
use crate::types::C;
use crate::types::GroupId;
use crate::types::NodeId;
use crate::types::SnapshotData;

/// How often a node sends a heartbeat to each peer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of one heartbeat exchange.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(400);
/// A peer that answered no heartbeat for this long is judged down.
pub const DOWN_AFTER: Duration = Duration::from_millis(600);
/// A peer that has answered no heartbeat for this long is suspected. A replica grants a Pre-Vote
/// against a leader it suspects: the candidate campaigns only once it has judged that leader down
/// itself, and the two nodes' judgements can be up to a heartbeat round apart, so refusing until
/// this node judges the leader down too would cost the candidate a whole retry.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(300);
/// A follower that knows no leader asks its peers to wake it and waits this long before it
/// campaigns itself.
pub const WAKE_GRACE: Duration = Duration::from_millis(1000);
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
}

impl LivenessView {
    pub fn is_down(&self, node: NodeId) -> bool {
        self.down.contains(&node)
    }

    /// Whether `leader`, leading `group` in `term` as this node knows it, is gone: judged down,
    /// or it said it no longer knows the group's leader.
    pub fn leader_gone(&self, group: GroupId, leader: NodeId, term: u64) -> bool {
        self.is_down(leader) || self.disowned.get(&group) == Some(&(leader, term))
    }
}

struct PeerState {
    addr: String,
    /// The last answered heartbeat, or when this node last could not judge (start, own stall).
    last_ok: Instant,
    incarnation: Option<u64>,
    in_flight: bool,
    sent: u64,
}

#[derive(Default)]
struct Inner {
    peers: BTreeMap<NodeId, PeerState>,
    /// Groups to name in the next heartbeat to each peer.
    wake: BTreeMap<NodeId, BTreeMap<GroupId, Wake>>,
    view: LivenessView,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct LivenessStats {
    /// Heartbeats sent to each peer since start.
    pub heartbeats_sent: BTreeMap<NodeId, u64>,
    /// Campaigns started by [`GroupWatch`] since start.
    pub elections: u64,
    pub down: BTreeSet<NodeId>,
}

/// The node's liveness tracker. See the module documentation.
pub struct Liveness {
    me: NodeId,
    incarnation: u64,
    inner: Mutex<Inner>,
    view: watch::Sender<LivenessView>,
    elections: AtomicU64,
}

impl Liveness {
    /// `incarnation` must differ on every start of this node.
    pub fn new(me: NodeId, incarnation: u64) -> Arc<Self> {
        Arc::new(Self {
            me,
            incarnation,
            inner: Mutex::new(Inner::default()),
            view: watch::Sender::new(LivenessView::default()),
            elections: AtomicU64::new(0),
        })
    }

    pub fn me(&self) -> NodeId {
        self.me
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

    /// True unless `node` is judged down. This node is always alive; a node that is not a
    /// peer (yet) counts as alive, so nothing acts on a node it knows nothing about.
    pub fn is_alive(&self, node: NodeId) -> bool {
        !self.view.borrow().is_down(node)
    }

    /// Sets the peers to watch (node id → Raft address); this node is left out.
    pub fn set_members(&self, members: BTreeMap<NodeId, String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.peers.retain(|id, _| members.contains_key(id));
        for (id, addr) in members {
            if id == self.me {
                continue;
            }
            let p = inner.peers.entry(id).or_insert_with(|| PeerState {
                addr: addr.clone(),
                last_ok: now,
                incarnation: None,
                in_flight: false,
                sent: 0,
            });
            p.addr = addr;
        }
        let peers: BTreeSet<NodeId> = inner.peers.keys().copied().collect();
        inner.wake.retain(|id, _| peers.contains(id));
        let mut view = inner.view.clone();
        view.down.retain(|id| peers.contains(id));
        view.ups.retain(|id, _| peers.contains(id));
        self.publish(&mut inner, view);
    }

    /// Asks `peers` to send the group a heartbeat if they lead it (carried by the next
    /// heartbeat).
    pub fn request_wake(&self, wake: Wake, peers: impl IntoIterator<Item = NodeId>) {
        let mut inner = self.lock();
        for p in peers {
            if p != self.me && inner.peers.contains_key(&p) {
                inner.wake.entry(p).or_default().insert(wake.group_id, wake);
            }
        }
    }

    /// Notes that `node`, which this node's replica of `group` follows in `term`, asked to be
    /// woken: it knows no leader, so it does not lead the group any more.
    pub fn disown(&self, group: GroupId, node: NodeId, term: u64) {
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        view.disowned.insert(group, (node, term));
        self.publish(&mut inner, view);
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
        }
    }

    fn publish(&self, inner: &mut Inner, view: LivenessView) {
        if view != inner.view {
            inner.view = view.clone();
            self.view.send_replace(view);
        }
    }

    /// The reply to a peer's heartbeat.
    pub fn answer(&self) -> NodeHeartbeat {
        NodeHeartbeat { from: self.me, incarnation: self.incarnation, wake: Vec::new() }
    }

    /// Sends heartbeats (over `peers`, connections of their own, so that bulk Raft traffic
    /// cannot make a live peer look down) and judges peers until `cancel` fires. A peer that
    /// comes back gets new connections in `raft_peers`: the old ones may lead to a frozen,
    /// partitioned or restarted process, and would fail until keepalive noticed.
    pub async fn run(self: Arc<Self>, peers: Arc<Peers>, raft_peers: Arc<Peers>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        let mut calls = FuturesUnordered::new();
        loop {
            tokio::select! {
                // Each arm only waits or records; nothing is left half done by another winning.
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {
                    let now = Instant::now();
                    // This node itself did not run for a while (a freeze, an overloaded machine):
                    // silence over that time says nothing about the peers.
                    let stalled = now.duration_since(last_tick) > HEARTBEAT_INTERVAL * 3;
                    last_tick = now;
                    for (id, addr, wake) in self.round(now, stalled) {
                        let client = RaftClient::new(peers.channel(id, &addr));
                        let req = NodeHeartbeat { from: self.me, incarnation: self.incarnation, wake };
                        calls.push(exchange(client, id, req));
                    }
                }
                Some((id, reply)) = calls.next(), if !calls.is_empty() => {
                    if self.record(id, reply) {
                        raft_peers.reconnect(id);
                    }
                }
            }
        }
    }

    /// Judges every peer, and picks the peers to send a heartbeat to now.
    fn round(&self, now: Instant, stalled: bool) -> Vec<(NodeId, String, Vec<Wake>)> {
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        let mut due = Vec::new();
        let Inner { peers, wake, .. } = &mut *inner;
        for (id, p) in peers.iter_mut() {
            if stalled {
                p.last_ok = p.last_ok.max(now);
            }
            if now.duration_since(p.last_ok) > DOWN_AFTER && view.down.insert(*id) {
                info!(
                    node = self.me,
                    peer = id,
                    "peer judged down: no heartbeat answered for {DOWN_AFTER:?}"
                );
            }
            if !p.in_flight {
                p.in_flight = true;
                p.sent += 1;
                let groups = wake.remove(id).map(|s| s.into_values().collect()).unwrap_or_default();
                due.push((*id, p.addr.clone(), groups));
            }
        }
        self.publish(&mut inner, view);
        due
    }

    /// Records a heartbeat's answer (or its absence). Returns whether the peer came back: it
    /// answered after being judged down, or from a new incarnation.
    fn record(&self, id: NodeId, reply: Option<NodeHeartbeat>) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut view = inner.view.clone();
        let Some(p) = inner.peers.get_mut(&id) else { return false };
        p.in_flight = false;
        let Some(reply) = reply.filter(|r| r.from == id) else { return false };
        p.last_ok = now;
        let restarted = p.incarnation.is_some_and(|i| i != reply.incarnation);
        let first = p.incarnation.is_none();
        p.incarnation = Some(reply.incarnation);
        let was_down = view.down.remove(&id);
        if was_down || restarted || first {
            *view.ups.entry(id).or_default() += 1;
            if was_down || restarted {
                info!(node = self.me, peer = id, restarted, "peer is up");
            }
        }
        self.publish(&mut inner, view);
        was_down || restarted
    }
}

async fn exchange(
    mut client: RaftClient<tonic::transport::Channel>,
    id: NodeId,
    req: NodeHeartbeat,
) -> (NodeId, Option<NodeHeartbeat>) {
    let mut request = tonic::Request::new(req);
    request.set_timeout(HEARTBEAT_TIMEOUT);
    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(request)).await {
        Ok(Ok(r)) => (id, Some(r.into_inner())),
        Ok(Err(status)) => {
            debug!(peer = id, "heartbeat failed: {}", status.message());
            (id, None)
        }
        Err(_) => (id, None),
    }
}

/// Asks `raft`, if it leads its group, to hand the leadership to `to`, and repeats the request
/// every [`TRANSFER_GRACE`] for as long as it still leads in the same term.
///
/// openraft sends a transfer request to the voters only once, and from then on the leader
/// refuses writes until another leader takes over. In a group without election timers nothing
/// else would end a transfer whose requests were lost (the leader cut off from its followers
/// when it started): the group would refuse writes for good. A repeated request reaches the
/// followers once the network lets it, and they elect a leader within [`TRANSFER_GRACE`] even
/// when `to` cannot take over (see `RaftService::transfer_leader`).
pub async fn transfer_leadership<SM>(raft: &Raft<C, SM>, to: NodeId) -> Result<(), openraft::errors::Fatal<C>>
where
    SM: RaftStateMachine<C>,
{
    let m = raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader || m.current_leader == Some(to) {
        return Ok(());
    }
    raft.trigger().transfer_leader(to).await?;
    let (raft, vote) = (raft.clone(), m.vote);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TRANSFER_GRACE).await;
            let m = raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader || m.vote != vote {
                return;
            }
            debug!(id = m.id, to, vote = %vote, "leadership transfer not done yet: asking again");
            if raft.trigger().transfer_leader(to).await.is_err() {
                return;
            }
        }
    });
    Ok(())
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
        // While leading: followers that came back and have not answered a heartbeat sent since
        // (→ the last answer before), and the last such heartbeat (when, how many so far).
        let mut returned: BTreeMap<NodeId, _> = BTreeMap::new();
        let mut returned_attempt: Option<(Instant, u32)> = None;
        loop {
            let m = server.borrow_watched().clone();
            let view = live.borrow_and_update().clone();
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
            if m.state != ServerState::Leader {
                returned.clear();
            }
            if m.state == ServerState::Leader {
                orphan = None;
                let members: BTreeSet<NodeId> =
                    m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
                // A follower whose node came back (a restart, a healed partition, a thaw) may
                // lack the commit point or entries, and only a message from this leader brings
                // them: heartbeat it until it has answered one sent since, or is down again.
                let acked = || self.raft.metrics().borrow_watched().heartbeat.clone().unwrap_or_default();
                let back: Vec<NodeId> = members
                    .iter()
                    .copied()
                    .filter(|n| {
                        *n != me
                            && view.ups.get(n).copied().unwrap_or(0) > seen_ups.get(n).copied().unwrap_or(0)
                    })
                    .collect();
                if !back.is_empty() {
                    let acked = acked();
                    for n in back {
                        returned.insert(n, acked.get(&n).copied().flatten());
                    }
                    returned_attempt = None;
                }
                if !returned.is_empty() {
                    let acked = acked();
                    returned.retain(|n, before| {
                        members.contains(n) && !view.is_down(*n) && acked.get(n).copied().flatten() <= *before
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
                    let wake = Wake { group_id: self.group, term, leader_lost };
                    self.liveness.request_wake(wake, voters.iter().copied());
                }
                let (since, attempts) = *orphan.get_or_insert((now, 0));
                let rank = campaign_rank(me, self.group, &voters, &view, dead_leader).unwrap_or(0) as u32;
                let wait = match attempts {
                    0 if dead_leader.is_none() => WAKE_GRACE,
                    0 => Duration::ZERO,
                    n => (RANK_STEP * 2 * n.min(16)).min(RETRY_MAX),
                };
                let at = since + wait + RANK_STEP * rank;
                if now >= at {
                    info!(node = me, group = self.group, rank, attempts, leader = ?dead_leader, term = m.vote.leader_id().term, disowned = ?view.disowned.get(&self.group), "no live leader: campaigning");
                    self.liveness.elections.fetch_add(1, Ordering::Relaxed);
                    if self.raft.trigger().elect(true).await.is_err() {
                        break;
                    }
                    orphan = Some((now, attempts + 1));
                    seen_ups = view.ups;
                    continue;
                }
                next = Some(at);
            } else {
                orphan = None;
                if opened {
                    let term = m.vote.leader_id().term;
                    let members = m.membership_config.membership().nodes().map(|(id, _)| *id);
                    self.liveness
                        .request_wake(Wake { group_id: self.group, term, leader_lost: false }, members);
                }
            }
            opened = false;
            seen_ups = view.ups;
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
                () = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
