//! The reconciler: on every partition group this node leads, moves the Raft membership toward
//! the replica set the metadata wants, one membership change at a time, and moves leadership to
//! where it belongs (away from draining nodes, back to preferred leaders).
//!
//! A move runs as: add the new replicas as learners → wait until each has caught up → make them
//! voters → hand leadership over if this leader is leaving → remove the old replicas → report
//! the move complete to the metadata group. Each step is one openraft call and the loop starts
//! over from the observed state, so a leader change, a crash or a cancelled move at any point
//! simply continues from where the group is. A joint configuration left by a leader that died
//! mid-change is finished first.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_raft::GroupId;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use eddy_raft::RaftMetrics;
use eddy_raft::liveness::Liveness;
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use crate::control::manager::Replicas;
use crate::meta::MetaCommand;
use crate::meta::MetaHandle;
use crate::meta::MetaView;
use crate::partition::PartitionHandle;

/// How often the reconciler looks at every group it leads while something is left to finish.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How often the reconciler looks at its groups when the last round found nothing to do but
/// wait for a live replica to catch up (which signals nothing). With nothing at all left, only
/// changes wake it: an idle node has no periodic pass over its groups.
pub const RECONCILE_IDLE_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after a change wakes the reconciler, so that a burst of changes costs one round.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(50);
/// A round woken by a change starts at least this long after the previous one ended. A
/// failover changes leaderships for seconds, one group after another, and back-to-back rounds
/// over every group were 15% of the surviving nodes' CPU while they elected 1,000 leaders
/// (a perf profile at 3,000 partitions).
const RECONCILE_GAP: Duration = Duration::from_millis(250);
/// A follower within this many entries of the leader's log is caught up (in sync).
pub const IN_SYNC_LAG_MAX: u64 = 256;
/// Automatic balancing moves a leadership back to a preferred replica only after it has been
/// in sync and answering liveness probes this long: a node that is restarting or shutting down
/// (and so still looks caught up for a moment) is not handed leaderships it would drop again.
/// A node that was frozen or restarted is busiest right after it returns (catching up every
/// group it hosts): at 3,000 partitions, transfers to it 3 to 7 s after a thaw failed and set
/// off elections.
pub const BALANCE_SETTLE: Duration = Duration::from_secs(10);
/// At most this many automatic balance transfers of one node are under way at once. A node
/// that returns after a freeze or a restart is the preferred leader of a third of the groups;
/// handing it a thousand leaderships at once makes every transfer slower than its deadline
/// while the groups refuse writes, and the failed ones are retried (seen at 3,000 partitions).
pub const BALANCE_MOVES_MAX: usize = 32;
/// A group whose leadership transfer was started is not asked again for this long: the
/// transfer repeats itself until it completes (`liveness::transfer_leadership`), and each new
/// request would only add another.
pub const TRANSFER_RETRY: Duration = Duration::from_secs(6);
/// Timeout of one membership change or metadata write.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A group's membership as its leader sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipView {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// The voter set of the last configuration, when the membership is joint.
    pub joint_target: Option<BTreeSet<NodeId>>,
}

impl MembershipView {
    pub fn of(m: &RaftMetrics) -> Self {
        let membership = m.membership_config.membership();
        let configs = membership.get_joint_config();
        Self {
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint_target: (configs.len() > 1).then(|| configs.last().cloned().unwrap_or_default()),
        }
    }
}

/// Followers whose log is within [`IN_SYNC_LAG_MAX`] entries of the leader's (the leader
/// included). A follower that has matched nothing is not, however short the log: a learner
/// whose node had not even opened its replica was promoted in a short group, and with another
/// voter damaged the group then needed its vote, which an empty log does not give (seed 123).
pub fn in_sync(m: &RaftMetrics) -> BTreeSet<NodeId> {
    let last = m.last_log_index.unwrap_or(0);
    let mut out: BTreeSet<NodeId> = m
        .replication
        .iter()
        .flatten()
        .filter(|(_, matched)| matched.is_some_and(|l| l.index + IN_SYNC_LAG_MAX >= last))
        .map(|(id, _)| *id)
        .collect();
    out.insert(m.id);
    out
}

/// The replicas of `group` in sync (see [`in_sync`]) whose nodes answer liveness probes (node
/// liveness: idle partition groups exchange no messages of their own, so their own acks say
/// nothing), without those their nodes reported damaged: a damaged replica keeps the index it
/// had matched, but it does not run, so no hand-over, balance or promotion may pick it.
pub fn responsive(group: GroupId, m: &RaftMetrics, liveness: &Liveness) -> BTreeSet<NodeId> {
    let mut out = alive_among(in_sync(m), m.id, liveness);
    out.retain(|n| *n == m.id || !liveness.replica_damaged(group, *n));
    out
}

/// `nodes` without those node liveness does not judge alive (`me` always is).
fn alive_among(mut nodes: BTreeSet<NodeId>, me: NodeId, liveness: &Liveness) -> BTreeSet<NodeId> {
    nodes.retain(|id| *id == me || liveness.is_alive(*id));
    nodes
}

/// Whether `node` has every entry of this leader's log, including one of the current term (the
/// leader's first entry in it): it has accepted this leader, and a transfer to it can complete
/// at once.
pub fn has_all_entries(m: &RaftMetrics, node: NodeId) -> bool {
    let matched = m.replication.as_ref().and_then(|r| r.get(&node).copied().flatten());
    matched.is_some_and(|l| Some(l.index) == m.last_log_index && l.leader_id.term == m.current_term)
}

/// A voter other than `m.id` to hand this leader's leadership of `group` to: responsive, lowest
/// id first.
pub fn successor(group: GroupId, m: &RaftMetrics, liveness: &Liveness) -> Option<NodeId> {
    let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
    responsive(group, m, liveness).into_iter().find(|n| *n != m.id && voters.contains(n))
}

/// How a reconciler round treats leaderships that are not on their preferred replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Leave them (only draining nodes give leaderships away).
    Off,
    /// Move them once the preferred replica has settled (automatic balancing).
    Settled,
    /// Move them now if the preferred replica is responsive (an operator asked).
    Now,
}

/// The next step toward `desired` for a group whose leader is `me`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Finish a joint configuration left behind.
    FinishJoint(BTreeSet<NodeId>),
    AddLearner(NodeId),
    Promote(NodeId),
    /// This leader is not in the desired set: hand leadership to this desired voter.
    HandOver(NodeId),
    RemoveVoters(BTreeSet<NodeId>),
    RemoveLearners(BTreeSet<NodeId>),
    /// The membership matches: report the move done.
    Complete,
    /// Nothing to do now (e.g. waiting for a learner to catch up).
    Wait,
}

/// Decides the next membership step. Pure, so it is tested on its own.
pub fn next_step(me: NodeId, desired: &[NodeId], view: &MembershipView, in_sync: &BTreeSet<NodeId>) -> Step {
    if let Some(target) = &view.joint_target {
        return Step::FinishJoint(target.clone());
    }
    let desired_set: BTreeSet<NodeId> = desired.iter().copied().collect();
    let members: BTreeSet<NodeId> = view.voters.union(&view.learners).copied().collect();
    if let Some(n) = desired.iter().find(|n| !members.contains(n)) {
        return Step::AddLearner(*n);
    }
    let waiting: Vec<NodeId> = view.learners.iter().filter(|n| desired_set.contains(n)).copied().collect();
    if let Some(n) = waiting.iter().find(|n| in_sync.contains(n)) {
        return Step::Promote(*n);
    }
    if !waiting.is_empty() {
        return Step::Wait;
    }
    // Every desired node is a voter now.
    if !desired_set.contains(&me) {
        return match desired.iter().find(|n| in_sync.contains(n)) {
            Some(n) => Step::HandOver(*n),
            None => Step::Wait,
        };
    }
    let extra_voters: BTreeSet<NodeId> = view.voters.difference(&desired_set).copied().collect();
    if !extra_voters.is_empty() {
        return Step::RemoveVoters(extra_voters);
    }
    let extra_learners: BTreeSet<NodeId> = view.learners.difference(&desired_set).copied().collect();
    if !extra_learners.is_empty() {
        return Step::RemoveLearners(extra_learners);
    }
    Step::Complete
}

/// The replica that should lead: the first of `desired` that may lead and is in sync, if any.
pub fn preferred_leader(desired: &[NodeId], view: &MetaView, in_sync: &BTreeSet<NodeId>) -> Option<NodeId> {
    desired
        .iter()
        .copied()
        .find(|n| in_sync.contains(n) && view.state.nodes.get(n).is_some_and(|r| r.state.may_lead()))
}

pub struct Reconciler {
    pub me: NodeId,
    pub meta: MetaHandle,
    pub replicas: Arc<Replicas>,
    pub liveness: Arc<Liveness>,
    /// Move leaderships back to preferred replicas on its own.
    pub auto_balance: bool,
    /// Since when each (group, replica) has been responsive, as this leader saw it.
    pub responsive_since: std::sync::Mutex<BTreeMap<(GroupId, NodeId), tokio::time::Instant>>,
    /// Groups whose leadership transfer this node started, and when (see [`TRANSFER_RETRY`]).
    pub moving: std::sync::Mutex<BTreeMap<GroupId, tokio::time::Instant>>,
    /// The last round left something to finish.
    pub pending: AtomicBool,
    /// The last round left a balance waiting for a live replica to catch up.
    pub waiting: AtomicBool,
}

impl Reconciler {
    /// Runs a round on every change of the metadata, of node liveness and of this node's
    /// leaderships, and besides every [`RECONCILE_INTERVAL`] while a round left something to
    /// finish (a membership step, a leadership waiting to settle), every
    /// [`RECONCILE_IDLE_INTERVAL`] while a balance waits for a live replica to catch up, and
    /// otherwise never: an idle cluster's thousands of groups cost no periodic pass (every 5 s,
    /// it was a tenth of an idle node's CPU at 3,000 partitions).
    pub async fn run(&self, cancel: CancellationToken) {
        let mut rx = self.meta.subscribe();
        let mut live = self.liveness.subscribe();
        loop {
            let seen = rx.borrow_and_update().clone();
            self.round(if self.auto_balance { Balance::Settled } else { Balance::Off }).await;
            let ended = tokio::time::Instant::now();
            let interval = if self.pending.load(Ordering::Relaxed) {
                Some(RECONCILE_INTERVAL)
            } else if self.waiting.load(Ordering::Relaxed) {
                Some(RECONCILE_IDLE_INTERVAL)
            } else {
                None
            };
            let deadline = interval.map(|i| tokio::time::Instant::now() + i);
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(timer);
            let woken = loop {
                tokio::select! {
                    // Each arm only waits.
                    _ = cancel.cancelled() => return,
                    () = &mut timer => break false,
                    r = rx.changed() => {
                        if r.is_err() {
                            return;
                        }
                        // Consumer groups change the metadata many times a second, but not
                        // what a round looks at.
                        if !rx.borrow_and_update().same_placement(&seen) {
                            break true;
                        }
                    }
                    r = live.changed() => if r.is_err() { return } else { break true },
                    () = self.liveness.leaders_changed().notified() => break true,
                }
            };
            if woken {
                // Changes come in bursts (a failover changes a thousand leaderships): one round
                // for each burst, and rounds at most every RECONCILE_GAP.
                let now = tokio::time::Instant::now();
                tokio::time::sleep_until((now + RECONCILE_DEBOUNCE).max(ended + RECONCILE_GAP)).await;
            }
        }
    }

    /// One pass over the groups this node leads. Returns how many leadership transfers it
    /// started.
    pub async fn round(&self, balance: Balance) -> u32 {
        let view = self.meta.view();
        let now = tokio::time::Instant::now();
        let mut transfers = 0;
        let mut pending = false;
        let mut waiting = false;
        let mut seen = BTreeMap::new();
        // Transfers started less than TRANSFER_RETRY ago, of groups this node still leads.
        let mut moving = std::mem::take(&mut *self.moving.lock().unwrap_or_else(|e| e.into_inner()));
        moving.retain(|_, at| now - *at < TRANSFER_RETRY);
        let mut still_moving = BTreeMap::new();
        for g in self.replicas.all() {
            // What a round needs of the metrics, read in place: a round looks at every group
            // this node leads, and cloning each group's metrics (its membership with every
            // node's addresses, its replication maps) was most of a round's cost.
            let (sync, membership) = {
                let metrics = g.raft().metrics();
                let m = metrics.borrow_watched();
                if m.current_leader != Some(self.me) {
                    continue;
                }
                (in_sync(&m), MembershipView::of(&m))
            };
            // A replica whose node said it is damaged keeps the index it had matched, but it
            // does not run: neither a hand-over nor a balance may pick it (as in `responsive`).
            let mut sync = sync;
            sync.retain(|n| *n == self.me || !self.liveness.replica_damaged(g.group(), *n));
            let Some((_, _, p)) = view.partition_of(g.group()) else {
                continue;
            };
            let desired = p.desired().to_vec();
            let step = next_step(self.me, &desired, &membership, &sync);
            pending |= step != Step::Complete || p.target.is_some();
            if step != Step::Complete && step != Step::Wait {
                self.apply(&g, &view, &desired, step).await;
                continue;
            }
            if step == Step::Complete && p.target.is_some() {
                let cmd = MetaCommand::CompleteMove { group: g.group(), replicas: desired.clone() };
                match self.meta.write(cmd, STEP_TIMEOUT).await {
                    Ok(_) => info!(group = g.group(), ?desired, "partition move complete"),
                    Err(e) => warn!(group = g.group(), "reporting a completed move failed: {e}"),
                }
                continue;
            }
            // Leadership: never on a node that may not lead; back to the preferred one when asked.
            let responsive = alive_among(sync, self.me, &self.liveness);
            {
                let since = self.responsive_since.lock().unwrap_or_else(|e| e.into_inner());
                for n in &responsive {
                    let at = since.get(&(g.group(), *n)).copied().unwrap_or(now);
                    seen.insert((g.group(), *n), at);
                }
                drop(since);
            }
            let my_state = view.state.nodes.get(&self.me).map(|n| n.state);
            let must_leave = my_state.is_some_and(|s| !s.may_lead());
            if !must_leave && balance == Balance::Off {
                continue;
            }
            // An automatic balance waits until every desired replica is responsive again: while
            // one is down or frozen, the groups it led have just failed over, and moving them on
            // to the next replica in line would only refuse writes once more for a transfer,
            // and again when the preferred one returns.
            if !must_leave && balance == Balance::Settled && !desired.iter().all(|n| responsive.contains(n)) {
                // A replica that is down wakes a round when it comes back; one that is up but
                // behind signals nothing when it catches up, so it is looked at again later.
                waiting |= desired.iter().all(|n| *n == self.me || self.liveness.is_alive(*n));
                continue;
            }
            let Some(to) = preferred_leader(&desired, &view, &responsive) else {
                continue;
            };
            let settled = seen.get(&(g.group(), to)).is_some_and(|at| now - *at >= BALANCE_SETTLE);
            pending |= to != self.me;
            if to == self.me || !(must_leave || balance == Balance::Now || settled) {
                continue;
            }
            if let Some(at) = moving.get(&g.group()) {
                still_moving.insert(g.group(), *at);
                continue;
            }
            if !must_leave && balance == Balance::Settled {
                // Automatic balancing goes at a pace the target can take: a few transfers at a
                // time, each to a replica that already has every entry of this term (so it can
                // campaign at once, with nothing to catch up while the group refuses writes).
                if !has_all_entries(&g.raft().metrics().borrow_watched(), to)
                    || still_moving.len() >= BALANCE_MOVES_MAX
                {
                    continue;
                }
            }
            info!(group = g.group(), to, must_leave, "moving leadership");
            if eddy_raft::liveness::transfer_leadership(g.raft(), g.group(), to, &self.liveness).await.is_ok()
            {
                transfers += 1;
                still_moving.insert(g.group(), now);
            }
            // A leader refuses writes while a transfer is under way, and a transfer the target
            // cannot take (e.g. it has flushed nothing of this term yet, as after a restart into
            // a quiet group) fails only after a timeout: an automatic balance does not try again
            // before the target has settled once more.
            if !must_leave {
                seen.insert((g.group(), to), now);
            }
        }
        // Only groups this node still leads, and replicas still responsive, keep their clocks.
        *self.responsive_since.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        *self.moving.lock().unwrap_or_else(|e| e.into_inner()) = still_moving;
        self.pending.store(pending, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        transfers
    }

    async fn apply(&self, g: &PartitionHandle, view: &MetaView, desired: &[NodeId], step: Step) {
        let group = g.group();
        let addr = |n: NodeId| -> Option<NodeAddr> { view.state.nodes.get(&n).map(|r| r.addr.clone()) };
        info!(group, ?step, ?desired, "membership step");
        // A quiescent leader's lease has lapsed; a membership change needs a live one.
        if !matches!(step, Step::HandOver(_)) {
            g.renew_lease().await;
        }
        let raft = g.raft();
        let r = match step.clone() {
            Step::FinishJoint(voters) => tokio::time::timeout(
                STEP_TIMEOUT,
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false),
            )
            .await
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Step::AddLearner(n) => {
                let Some(a) = addr(n) else { return };
                tokio::time::timeout(STEP_TIMEOUT, raft.add_learner(n, a, false))
                    .await
                    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
            }
            Step::Promote(n) => tokio::time::timeout(
                STEP_TIMEOUT,
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([n])), false),
            )
            .await
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Step::HandOver(n) => tokio::time::timeout(
                STEP_TIMEOUT,
                eddy_raft::liveness::transfer_leadership(raft, group, n, &self.liveness),
            )
            .await
            .map(|r| r.map_err(|e| e.to_string())),
            Step::RemoveVoters(ids) => tokio::time::timeout(
                STEP_TIMEOUT,
                raft.change_membership(ChangeMembers::RemoveVoters(ids), false),
            )
            .await
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Step::RemoveLearners(ids) => tokio::time::timeout(
                STEP_TIMEOUT,
                raft.change_membership(ChangeMembers::RemoveNodes(ids), false),
            )
            .await
            .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Step::Complete | Step::Wait => return,
        };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(group, ?step, "membership step failed: {e}"),
            Err(_) => warn!(group, ?step, "membership step timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(voters: &[u64], learners: &[u64]) -> MembershipView {
        MembershipView {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            joint_target: None,
        }
    }

    #[test]
    fn a_balance_target_must_have_an_entry_of_this_term() {
        let mut m = RaftMetrics::new_initial(1);
        m.current_term = 5;
        m.last_log_index = Some(10);
        let matched = [(2, 5, 10), (3, 4, 10), (4, 5, 9)];
        m.replication = Some(matched.iter().map(|(n, t, i)| (*n, Some(eddy_raft::log_id(*t, *i)))).collect());
        assert!(has_all_entries(&m, 2));
        assert!(!has_all_entries(&m, 3), "matched an entry of an older term only");
        assert!(!has_all_entries(&m, 4), "one entry behind");
        assert!(!has_all_entries(&m, 5), "not replicated to");
    }

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_follower_that_matched_nothing_is_not_in_sync_however_short_the_log() {
        let mut m = RaftMetrics::new_initial(1);
        m.current_term = 2;
        // Node 2 is within IN_SYNC_LAG_MAX of the leader; node 3 matched nothing yet (seed
        // 123: its node had not opened the replica); node 4 matched only the first entry.
        m.replication = Some(
            [(2, Some(eddy_raft::log_id(2, 0))), (3, None), (4, Some(eddy_raft::log_id(1, 0)))]
                .into_iter()
                .collect(),
        );
        m.last_log_index = Some(IN_SYNC_LAG_MAX + 5);
        m.replication.as_mut().unwrap().insert(2, Some(eddy_raft::log_id(2, 10)));
        assert_eq!(in_sync(&m), set(&[1, 2]));
        m.last_log_index = Some(12);
        assert_eq!(in_sync(&m), set(&[1, 2, 4]), "a short log: every follower that matched anything");
    }

    #[test]
    fn a_move_runs_learner_catch_up_promote_handover_remove_complete() {
        // Move [1,2,3] -> [2,3,4], led by 1.
        let d = [2, 3, 4];
        assert_eq!(next_step(1, &d, &view(&[1, 2, 3], &[]), &set(&[1, 2, 3])), Step::AddLearner(4));
        assert_eq!(
            next_step(1, &d, &view(&[1, 2, 3], &[4]), &set(&[1, 2, 3])),
            Step::Wait,
            "4 is catching up"
        );
        assert_eq!(next_step(1, &d, &view(&[1, 2, 3], &[4]), &set(&[1, 2, 3, 4])), Step::Promote(4));
        assert_eq!(next_step(1, &d, &view(&[1, 2, 3, 4], &[]), &set(&[1, 2, 3, 4])), Step::HandOver(2));
        // Node 2 now leads.
        assert_eq!(
            next_step(2, &d, &view(&[1, 2, 3, 4], &[]), &set(&[1, 2, 3, 4])),
            Step::RemoveVoters(set(&[1]))
        );
        assert_eq!(next_step(2, &d, &view(&[2, 3, 4], &[]), &set(&[2, 3, 4])), Step::Complete);
        // A cancelled move reverts the same way.
        assert_eq!(next_step(2, &[1, 2, 3], &view(&[2, 3, 4], &[]), &set(&[2, 3, 4])), Step::AddLearner(1));
        assert_eq!(
            next_step(2, &[1, 2, 3], &view(&[1, 2, 3, 4], &[]), &set(&[1, 2, 3, 4])),
            Step::RemoveVoters(set(&[4]))
        );
        assert_eq!(
            next_step(2, &[1, 2, 3], &view(&[1, 2, 3], &[4]), &set(&[1, 2, 3])),
            Step::RemoveLearners(set(&[4]))
        );
    }

    #[test]
    fn a_joint_configuration_is_finished_first() {
        let mut v = view(&[1, 2, 3, 4], &[]);
        v.joint_target = Some(set(&[2, 3, 4]));
        assert_eq!(next_step(2, &[2, 3, 4], &v, &set(&[1, 2, 3, 4])), Step::FinishJoint(set(&[2, 3, 4])));
    }
}
