//! Duties of the metadata leader that no single request triggers: removing a decommissioned
//! node once it holds no replica (from the metadata group first, then marking it removed, so
//! that "removed" means its machine may be switched off), and keeping the metadata group at up
//! to five voters by promoting learners before voters leave. Runs on every node; acts only on the leader.

use std::collections::BTreeSet;
use std::time::Duration;

use eddy_raft::META_GROUP;
use eddy_raft::NodeId;
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use crate::meta::MetaCommand;
use crate::meta::MetaHandle;
use crate::meta::handle::META_VOTERS_MAX;
use crate::meta::state::NodeState;

const CONTROLLER_INTERVAL: Duration = Duration::from_secs(1);
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Controller {
    pub me: NodeId,
    pub meta: MetaHandle,
    pub liveness: std::sync::Arc<eddy_raft::liveness::Liveness>,
    /// The planted bug `decommission-forgets-moving`: a partition that was moving when its
    /// node's decommission began is never planned away (the second half of seed 43's fix undone).
    pub forget_moving: bool,
}

impl Controller {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                // Both arms only wait.
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(CONTROLLER_INTERVAL) => {}
            }
            if self.meta.leader() == Some(self.me) {
                self.round().await;
            }
        }
    }

    async fn round(&self) {
        let view = self.meta.view();
        let counts = view.state.replica_counts();
        let membership = self.meta.raft().metrics().borrow_watched().membership_config.membership().clone();
        let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let leaving = |id: &NodeId| {
            view.state
                .nodes
                .get(id)
                .is_some_and(|n| matches!(n.state, NodeState::Decommissioning | NodeState::Removed))
        };
        // Voters first: an active learner takes the place of a voter that is leaving or gone,
        // before that voter leaves, so the group keeps its size and its quorum.
        let staying = voters.iter().filter(|v| !leaving(v)).count();
        if staying < META_VOTERS_MAX {
            let candidate = membership
                .learner_ids()
                .find(|l| view.state.nodes.get(l).is_some_and(|n| n.state == NodeState::Active));
            if let Some(l) = candidate {
                info!(node = l, "promoting a metadata learner to voter");
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([l]));
                match tokio::time::timeout(STEP_TIMEOUT, self.meta.raft().change_membership(change, false))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(node = l, "promoting the learner failed: {e}"),
                    Err(_) => warn!(node = l, "promoting the learner timed out"),
                }
                return;
            }
        }
        // A decommission leaves partitions that were moving at the time alone; once such a move
        // completes, the node's remaining replicas are planned away by deciding again.
        for (id, n) in &view.state.nodes {
            let unplanned = !self.forget_moving
                && n.state == NodeState::Decommissioning
                && view
                    .state
                    .topics
                    .values()
                    .flat_map(|t| &t.partitions)
                    .any(|p| p.target.is_none() && p.replicas.contains(id));
            if unplanned {
                info!(node = id, "planning the moves of a decommissioned node's remaining replicas");
                let cmd = MetaCommand::SetNodeState { node: *id, state: NodeState::Decommissioning };
                if let Err(e) = self.meta.write(cmd, STEP_TIMEOUT).await {
                    warn!(node = id, "planning the decommission's remaining moves failed: {e}");
                }
                return;
            }
        }
        for (id, n) in &view.state.nodes {
            let emptied = n.state == NodeState::Decommissioning && counts.get(id).copied().unwrap_or(0) == 0;
            // A decommissioned node leaves the metadata group before it is marked removed:
            // "removed" tells the operator the machine may be switched off, and switching off
            // a node that still votes in the metadata group would cost the group its quorum
            // once a majority of its voters were decommissioned.
            let lingering = n.state == NodeState::Removed;
            if !(emptied || lingering) {
                continue;
            }
            if members.contains(id) {
                if *id == self.me {
                    // A leader cannot remove itself cleanly: hand the leadership over first.
                    let m = self.meta.raft().metrics().borrow_watched().clone();
                    if let Some(to) = crate::control::reconciler::successor(META_GROUP, &m, &self.liveness) {
                        info!(to, "this node is leaving; handing the metadata leadership over");
                        let _ = eddy_raft::liveness::transfer_leadership(
                            self.meta.raft(),
                            META_GROUP,
                            to,
                            &self.liveness,
                        )
                        .await;
                    }
                    return;
                }
                info!(node = id, "decommissioned node holds no replica; removing it from the metadata group");
                if let Err(e) = self.meta.leave(*id, STEP_TIMEOUT).await {
                    warn!(node = id, "removing the node from the metadata group failed: {e}");
                }
                return;
            }
            if emptied {
                info!(
                    node = id,
                    "decommissioned node holds no replica and left the metadata group; marking it removed"
                );
                if let Err(e) = self
                    .meta
                    .write(MetaCommand::SetNodeState { node: *id, state: NodeState::Removed }, STEP_TIMEOUT)
                    .await
                {
                    warn!(node = id, "marking the node removed failed: {e}");
                }
            }
        }
    }
}
