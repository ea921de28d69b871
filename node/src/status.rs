//! What every node knows about the partitions it hosts, and the cluster-wide view assembled by
//! asking every node (`NodeStatus`). Metadata, `topic describe`, health and node lists use it.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use eddy_proto::v1 as pb;
use eddy_proto::v1::broker_client::BrokerClient;
use eddy_raft::GroupId;
use eddy_raft::NodeId;
use eddy_raft::RaftMetrics;
use eddy_raft::liveness::Liveness;
use futures::future::join_all;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tonic::Request;

use crate::control::reconciler::MembershipView;
use crate::control::reconciler::in_sync;
use crate::service::BrokerState;

/// How long a node waits for a peer's status when assembling the cluster view.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a gathered cluster status answers later metadata requests. Leadership news reaches
/// clients this much later at most; a client sent to a former leader follows its `not_leader`
/// hint at once.
pub const STATUS_REUSE: Duration = Duration::from_millis(100);

/// Whether a replica has nothing to do: everything it holds is committed and applied, a leader's
/// followers all have its whole log, and a follower knows a leader whose node is alive. Such a
/// group sends and schedules nothing until a write, a membership change or a liveness change.
pub fn is_quiescent(m: &RaftMetrics, liveness: &Liveness) -> bool {
    let last = m.last_log_index;
    let applied = m.last_applied.as_ref().map(|l| l.index);
    if applied != last {
        return false;
    }
    match m.state {
        ServerState::Leader => {
            m.replication.iter().flatten().all(|(_, matched)| matched.as_ref().map(|l| l.index) == last)
        }
        ServerState::Follower | ServerState::Learner => {
            m.current_leader.is_some_and(|l| l != m.id && liveness.is_alive(l))
        }
        ServerState::Candidate | ServerState::Shutdown => false,
    }
}

/// A partition, merged from its replicas' own reports.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// The leader: a replica that reports leading (highest term), else the newest belief.
    pub leader: Option<NodeId>,
    pub term: u64,
    pub hw: u64,
    pub log_start: u64,
    pub from_leader: bool,
    /// From the leader's report.
    pub in_sync: Vec<NodeId>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub joint: bool,
    /// Replicas that answered.
    pub reporters: BTreeSet<NodeId>,
}

/// The cluster as the nodes that answered describe it.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    pub answered: BTreeMap<NodeId, Arc<pb::NodeStatusResponse>>,
    pub partitions: BTreeMap<GroupId, Merged>,
}

impl ClusterStatus {
    /// Partitions each node leads.
    pub fn leader_counts(&self) -> BTreeMap<NodeId, u32> {
        let mut c = BTreeMap::new();
        for m in self.partitions.values() {
            if let (Some(l), true) = (m.leader, m.from_leader) {
                *c.entry(l).or_default() += 1;
            }
        }
        c
    }
}

impl BrokerState {
    /// This node's own report.
    pub fn local_status(&self) -> pb::NodeStatusResponse {
        let mut quiescent = 0;
        let partitions: Vec<pb::PartitionStatus> = self
            .replicas
            .all()
            .into_iter()
            .map(|h| {
                let s = h.status();
                // Read in place, not cloned: client metadata asks for this report of every
                // partition, and a failover makes every client ask at once.
                let metrics = h.raft().metrics();
                let m = metrics.borrow_watched();
                quiescent += u32::from(is_quiescent(&m, &self.liveness));
                let view = MembershipView::of(&m);
                pb::PartitionStatus {
                    topic: h.topic().to_owned(),
                    partition: h.partition(),
                    group_id: h.group(),
                    leader: s.leader,
                    term: s.term,
                    high_watermark: s.progress.next_offset,
                    log_start_offset: s.progress.log_start_offset,
                    is_leader: s.is_leader,
                    in_sync: if s.is_leader { in_sync(&m).into_iter().collect() } else { Vec::new() },
                    voters: view.voters.into_iter().collect(),
                    learners: view.learners.into_iter().collect(),
                    joint: view.joint_target.is_some(),
                }
            })
            .collect();
        pb::NodeStatusResponse {
            node_id: self.me,
            metadata_leader: self.meta.leader(),
            ready: self.meta.is_ready(),
            replicas: u32::try_from(partitions.len()).unwrap_or(u32::MAX),
            quiescent_replicas: quiescent,
            partitions,
        }
    }

    /// This node's own report as of at most [`STATUS_REUSE`] ago: what client metadata needs.
    /// Every node is asked for its report by every node that answers metadata, and each report
    /// walks every replica the node hosts (3,000 at a time in a failover, many times a second).
    pub fn recent_local_status(&self) -> Arc<pb::NodeStatusResponse> {
        let mut cached = self.local_status_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, status)) = cached.as_ref()
            && at.elapsed() < STATUS_REUSE
        {
            return status.clone();
        }
        let status = Arc::new(self.local_status());
        *cached = Some((tokio::time::Instant::now(), status.clone()));
        status
    }

    /// The cluster's status, gathered now: for operators' views (describe, health, group lag),
    /// which must agree with what they read next (a group's commit never above the high
    /// watermark shown beside it).
    pub async fn cluster_status(&self) -> ClusterStatus {
        self.gather_status(false).await
    }

    /// The cluster's status, gathered at most [`STATUS_REUSE`] ago, for client metadata. One
    /// gathering runs at a time and every caller waiting meanwhile takes its result: when a node
    /// dies, a thousand producers refresh their metadata at once, and each refresh gathering the
    /// status of every partition from every node kept the surviving nodes' CPUs busy.
    pub async fn recent_cluster_status(&self) -> Arc<ClusterStatus> {
        let mut cached = self.status_cache.lock().await;
        if let Some((at, status)) = cached.as_ref()
            && at.elapsed() < STATUS_REUSE
        {
            return status.clone();
        }
        let status = Arc::new(self.gather_status(true).await);
        *cached = Some((tokio::time::Instant::now(), status.clone()));
        status
    }

    /// Asks every node for its report (in parallel, with a deadline) and merges the answers;
    /// `recent`: reports up to [`STATUS_REUSE`] old will do.
    async fn gather_status(&self, recent: bool) -> ClusterStatus {
        let view = self.meta.view();
        let calls = view.state.nodes.iter().map(|(id, n)| {
            let (id, addr) = (*id, n.addr.client_addr.clone());
            async move {
                if id == self.me {
                    return Some(if recent {
                        self.recent_local_status()
                    } else {
                        Arc::new(self.local_status())
                    });
                }
                // A node judged down (crashed, frozen, cut off) would only make every metadata
                // request wait out the deadline.
                if !self.liveness.is_alive(id) {
                    return None;
                }
                let mut client = BrokerClient::new(self.client_peers.channel(id, &addr));
                let mut req = Request::new(pb::NodeStatusRequest { recent });
                req.set_timeout(STATUS_TIMEOUT);
                match tokio::time::timeout(STATUS_TIMEOUT, client.node_status(req)).await {
                    Ok(Ok(r)) => Some(Arc::new(r.into_inner())),
                    _ => None,
                }
            }
        });
        let mut out = ClusterStatus::default();
        for status in join_all(calls).await.into_iter().flatten() {
            for p in &status.partitions {
                let m = out.partitions.entry(p.group_id).or_default();
                m.reporters.insert(status.node_id);
                if p.is_leader {
                    if !m.from_leader || p.term > m.term {
                        m.term = p.term;
                        m.leader = Some(status.node_id);
                        m.hw = p.high_watermark;
                        m.log_start = p.log_start_offset;
                        m.in_sync = p.in_sync.clone();
                        m.voters = p.voters.clone();
                        m.learners = p.learners.clone();
                        m.joint = p.joint;
                        m.from_leader = true;
                    }
                } else if !m.from_leader {
                    if p.term > m.term || (p.term == m.term && m.leader.is_none()) {
                        m.term = p.term;
                        m.leader = p.leader;
                    }
                    m.hw = m.hw.max(p.high_watermark);
                    m.log_start = m.log_start.max(p.log_start_offset);
                    if m.voters.is_empty() {
                        m.voters = p.voters.clone();
                        m.learners = p.learners.clone();
                    }
                }
            }
            out.answered.insert(status.node_id, status);
        }
        out
    }
}
