//! Watches the running nodes from outside: which node leads each group in each term (for the
//! election-safety check and the timeline), sampled every few simulated milliseconds.
//!
//! A leadership is logged once, when a node is first seen leading a (group, term). A node that
//! still believes it leads an older term than one already seen for its group (isolated, it has
//! not heard of the election) is logged once as a stale leader, not as a change: while a stale
//! leader and the new one alternate in the samples, nothing more is logged.

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
    /// The highest term seen led per group.
    newest: BTreeMap<GroupId, u64>,
    /// (group, term, node) logged as stale leaders.
    stale: BTreeSet<(GroupId, u64, NodeId)>,
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
                let newest = self.newest.entry(group).or_insert(term);
                if term > *newest {
                    *newest = term;
                }
                let newest = *newest;
                if self.leaders.entry((group, term)).or_default().insert(*id) {
                    trace.push(now, "leader", format!("group {group} term {term}: n{id}"));
                } else if term < newest && self.stale.insert((group, term, *id)) {
                    trace.push(
                        now,
                        "stale-leader",
                        format!("group {group}: n{id} still leads term {term}; term {newest} has a leader"),
                    );
                }
            }
        }
    }
}
