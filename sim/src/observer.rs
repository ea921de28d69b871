//! Watches the running nodes from outside: which node leads each group in each term (for the
//! election-safety check and the timeline), sampled every few simulated milliseconds.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use eddy_raft::GroupId;
use eddy_raft::META_GROUP;
use eddy_raft::NodeId;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use crate::cluster::Cluster;
use crate::trace::Trace;

#[derive(Default)]
pub struct Observer {
    /// (group, term) -> nodes seen leading it.
    pub leaders: BTreeMap<(GroupId, u64), BTreeSet<NodeId>>,
    /// The last (term, leader) logged per group, to log changes only.
    last: BTreeMap<GroupId, (u64, NodeId)>,
}

impl Observer {
    pub fn observe(&mut self, now: u64, cluster: &Cluster, trace: &Trace) {
        for id in cluster.nodes.keys() {
            let Some(refs) = cluster.refs(*id) else { continue };
            let mut seen: Vec<(GroupId, u64, ServerState)> = Vec::new();
            {
                let m = refs.meta.raft().metrics();
                let m = m.borrow_watched();
                seen.push((META_GROUP, m.current_term, m.state));
            }
            for g in refs.replicas.all() {
                let m = g.raft().metrics();
                let m = m.borrow_watched();
                seen.push((g.group(), m.current_term, m.state));
            }
            for (group, term, state) in seen {
                if state != ServerState::Leader {
                    continue;
                }
                self.leaders.entry((group, term)).or_default().insert(*id);
                if self.last.get(&group) != Some(&(term, *id)) {
                    self.last.insert(group, (term, *id));
                    trace.push(now, "leader", format!("group {group} term {term}: n{id}"));
                }
            }
        }
    }
}
