//! The partition manager: keeps the Raft groups running on this node in line with the
//! partition assignment in the metadata.
//!
//! It watches the applied metadata and starts a group for every partition that lists this node
//! as a replica. A group is initialized (its first membership written) only on a pristine log,
//! and only by a replica the group was created with. Every initial replica initializes before
//! the group can be reached, so none ever votes with an empty log, and a partition whose
//! preferred leader dies early still forms; the preferred leader then campaigns at once.
//! Initializing with the same membership on several replicas is safe (openraft writes the same
//! entry, term 0 index 0).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use anyhow::Context;
use eddy_raft::GroupId;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use eddy_raft::Runtime;
use eddy_raft::liveness::GroupWatch;
use eddy_raft::liveness::Liveness;
use eddy_raft::log::LogConfig;
use eddy_raft::log::LogStore;
use eddy_raft::network::GroupNetwork;
use eddy_raft::registry::Registry;
use eddy_raft::transport::Peers;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::info;
use tracing::info_span;
use tracing::warn;

use crate::env::NodeEnv;
use crate::meta::MetaHandle;
use crate::meta::MetaView;
use crate::metrics::NodeMetrics;
use crate::partition::PartitionHandle;
use crate::partition::PartitionStateMachine;
use crate::partition::handle::PartitionParts;
use crate::partition::handle::PartitionRaft;
use crate::partition::retention::RetentionTask;
use crate::partition::retention::TopicSettings;
use crate::raft_config;

/// How soon reconciliation runs again after a replica failed to start (otherwise it waits for
/// the next metadata change).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// The partition replicas running on this node, and those it refuses to run because their log
/// is damaged.
#[derive(Default)]
pub struct Replicas {
    map: RwLock<BTreeMap<GroupId, PartitionHandle>>,
    damaged: RwLock<BTreeMap<GroupId, String>>,
}

impl Replicas {
    /// Replicas placed here whose log recovery found damaged (a bad entry with intact ones
    /// after it): not started, so they answer no leader and serve nothing, until a move takes
    /// them away (their data is then deleted). With why, for operators.
    pub fn damaged(&self) -> BTreeMap<GroupId, String> {
        self.damaged.read().expect("replicas lock poisoned").clone()
    }

    fn is_damaged(&self, group: GroupId) -> bool {
        self.damaged.read().expect("replicas lock poisoned").contains_key(&group)
    }

    pub fn get(&self, group: GroupId) -> Option<PartitionHandle> {
        self.map.read().expect("replicas lock poisoned").get(&group).cloned()
    }

    pub fn all(&self) -> Vec<PartitionHandle> {
        self.map.read().expect("replicas lock poisoned").values().cloned().collect()
    }

    fn insert(&self, h: PartitionHandle) {
        self.map.write().expect("replicas lock poisoned").insert(h.group(), h);
    }

    fn remove(&self, group: GroupId) -> Option<PartitionHandle> {
        self.map.write().expect("replicas lock poisoned").remove(&group)
    }

    fn take_all(&self) -> Vec<PartitionHandle> {
        std::mem::take(&mut *self.map.write().expect("replicas lock poisoned")).into_values().collect()
    }
}

pub struct PartitionManager {
    pub me: NodeId,
    pub env: NodeEnv,
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
    pub retention_check_interval: Duration,
    pub meta: MetaHandle,
    pub replicas: Arc<Replicas>,
    pub registry: Arc<Registry>,
    pub peers: Arc<Peers>,
    pub liveness: Arc<Liveness>,
    pub tasks: TaskTracker,
    pub metrics: Arc<NodeMetrics>,
    pub storage: crate::disk::StorageFailure,
    /// The clock time-based retention reads.
    pub retention_clock: Arc<crate::partition::retention::RetentionClock>,
}

/// The file whose presence in a group's directory says its deletion is under way.
const TOMBSTONE: &str = "deleting";

/// How long the manager waits for the metadata to confirm that a stopped replica may be
/// deleted before it tries again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The seed of a group's Raft randomness on a node: distinct per group, fixed per node seed.
pub fn group_seed(node_seed: u64, group: GroupId) -> u64 {
    node_seed ^ group.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The settings of a log on this node: its syncs timed into the metrics, its failures stopping
/// the node.
pub fn log_config(
    segment_bytes_max: u64,
    metrics: &Arc<NodeMetrics>,
    storage: &crate::disk::StorageFailure,
    env: &NodeEnv,
) -> LogConfig {
    #[cfg(not(feature = "planted-bugs"))]
    let _ = env;
    LogConfig {
        segment_bytes_max,
        on_sync: Some(metrics.sync_observer()),
        on_failure: Some(storage.observer()),
        #[cfg(feature = "planted-bugs")]
        ignore_disk_full: env.bugs.disk_full_ignored,
        #[cfg(feature = "planted-bugs")]
        ignore_fsync_failure: env.bugs.fsync_failure_ignored,
        #[cfg(feature = "planted-bugs")]
        ignore_corruption: env.bugs.corrupt_record_served,
    }
}

/// Whether a replica failed to start because its log is damaged (see
/// `eddy_raft::log::segments::Segments::recover`), not for a passing reason.
fn is_damage(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

impl PartitionManager {
    pub async fn run(self, cancel: CancellationToken) {
        let mut rx = self.meta.subscribe();
        let mut done: Option<Arc<MetaView>> = None;
        let mut failed = false;
        // Replicas stopped because this node's view no longer places them here, whose data is
        // deleted only once a confirmed view agrees (see `reconcile`).
        let mut stopped: BTreeSet<GroupId> = BTreeSet::new();
        loop {
            let view = rx.borrow_and_update().clone();
            // Nothing changes without a change of placement (nodes, topics, replicas), unless a
            // replica failed to start or a stopped one awaits deletion: only then is there a
            // retry, so an idle node does not walk its partitions every second, nor on every
            // consumer-group commit.
            if failed || !done.as_ref().is_some_and(|d| d.same_placement(&view)) {
                failed = self.reconcile(&view, &mut stopped, &cancel).await;
                done = Some(view);
            }
            let retry = async {
                if failed {
                    tokio::time::sleep(RECONCILE_INTERVAL).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                // Each arm only waits; none leaves work half done when another wins.
                _ = cancel.cancelled() => break,
                changed = rx.changed() => if changed.is_err() { break },
                () = retry => {}
            }
        }
        for g in self.replicas.take_all() {
            g.stop_tasks();
            self.registry.remove(g.group());
            if let Err(e) = g.raft().shutdown().await {
                warn!(group = g.group(), "stopping partition group: {e}");
            }
        }
    }

    /// Starts and stops replicas to match `view`, and deletes the data of those it stopped once
    /// a confirmed view agrees. Returns whether something is left to retry.
    ///
    /// This node's view may lag: a move may have brought a partition back here, and its leader
    /// may already count this replica's log (the learner it added had caught up, since its log
    /// was still there) as a voter's. Deleting that log would lose entries a quorum was counted
    /// on (simulator seed 37 with `--retention`). So a replica the view no longer places here is
    /// first stopped, so that it answers no leader any more, and its data is deleted only if the
    /// metadata as of a read index, taken after it stopped, does not place it here either. A
    /// move that brings it back later adds it afresh, with nothing counted.
    async fn reconcile(
        &self,
        view: &MetaView,
        stopped: &mut BTreeSet<GroupId>,
        cancel: &CancellationToken,
    ) -> bool {
        let mut failed = false;
        let placed_here =
            |group: GroupId| view.partition_of(group).is_some_and(|(_, _, p)| p.is_holder(self.me));
        // Replicas this node no longer holds: their topic is gone, or a move took them away.
        for g in self.replicas.all() {
            if !placed_here(g.group()) {
                stopped.insert(g.group());
                self.stop_group(g).await;
            }
        }
        // Damaged replicas moved away: their data goes the same way, once confirmed. A damaged
        // replica never ran, so no leader counts its log: it is gone once the placement's
        // replicas no longer list this node, even if a move under way adds the node back (that
        // move then gets a fresh replica; keeping the damaged one refused it for good, seed 100).
        let in_replicas =
            |group: GroupId| view.partition_of(group).is_some_and(|(_, _, p)| p.replicas.contains(&self.me));
        let mut damaged_gone = BTreeSet::new();
        self.replicas.damaged.write().expect("replicas lock poisoned").retain(|group, _| {
            let keep = in_replicas(*group);
            if !keep {
                info!(group, "a damaged replica was moved away");
                self.liveness.forget_damaged(*group);
                stopped.insert(*group);
                damaged_gone.insert(*group);
            }
            keep
        });
        if !stopped.is_empty() {
            match self.meta.confirmed_view(CONFIRM_TIMEOUT).await {
                Ok(confirmed) => {
                    for group in std::mem::take(stopped) {
                        let still = |p: &crate::meta::state::PartitionRecord| {
                            if damaged_gone.contains(&group) {
                                p.replicas.contains(&self.me)
                            } else {
                                p.is_holder(self.me)
                            }
                        };
                        if confirmed.partition_of(group).is_some_and(|(_, _, p)| still(p)) {
                            info!(
                                group,
                                "a replica this node's view no longer placed here is placed here again: keeping its data"
                            );
                            // Started again from the confirmed view, on the next round.
                            failed = true;
                        } else {
                            self.delete_group_data(group).await;
                        }
                    }
                }
                Err(e) => {
                    warn!(groups = ?stopped, "stopped replicas kept until the metadata confirms their removal: {e}");
                    failed = true;
                }
            }
        }
        for topic in view.state.topics.values() {
            for (i, p) in topic.partitions.iter().enumerate() {
                if cancel.is_cancelled() {
                    return failed;
                }
                if !p.is_holder(self.me) {
                    continue;
                }
                if let Some(g) = self.replicas.get(p.group_id) {
                    g.set_retention(TopicSettings::of(topic));
                    continue;
                }
                if self.replicas.is_damaged(p.group_id) {
                    self.report_damaged(p).await;
                    continue;
                }
                if stopped.contains(&p.group_id) {
                    // Stopped, and placed here again by a newer view than the one that stopped
                    // it: the confirmation above still decides; it starts on the next round.
                    failed = true;
                    continue;
                }
                let span = info_span!("partition", node = self.me, group = p.group_id, topic = %topic.name, partition = i);
                match self.start_group(view, &topic.name, i as u32, p, cancel).instrument(span).await {
                    Ok(h) => {
                        // Only a replica started afresh can follow a damaged one: a damaged
                        // replica never starts, and its data is deleted before it is placed here again.
                        let pristine = h.raft().metrics().borrow_watched().last_log_index.is_none();
                        self.replicas.insert(h);
                        if pristine {
                            self.report_running(p);
                        }
                    }
                    // Damage is not retried: recovery would find it again. The replica stays
                    // down, reported, until a move takes it away.
                    Err(e) if is_damage(&e) => {
                        tracing::error!(
                            group = p.group_id,
                            "partition {}/{i} is damaged on this node and will not start until it is moved to another node: {e:#}",
                            topic.name
                        );
                        self.replicas
                            .damaged
                            .write()
                            .expect("replicas lock poisoned")
                            .insert(p.group_id, format!("{e:#}"));
                        self.report_damaged(p).await;
                    }
                    Err(e) => {
                        failed = true;
                        warn!(group = p.group_id, "failed to start partition {}/{i}: {e:#}", topic.name)
                    }
                }
            }
        }
        self.remove_deleted_groups(view).await;
        failed
    }

    /// Deletes the log and state of partition groups whose topic was deleted while this node was
    /// down (a running replica is removed by `reconcile` itself). Only groups the view knows were
    /// created (below `next_group_id`) and that no topic holds any more: group ids are never
    /// reused, so such a group is gone for good, however far behind this view is. (A replica
    /// moved away while the node was down is not touched: a view behind the move back would
    /// delete a live replica.)
    async fn remove_deleted_groups(&self, view: &MetaView) {
        let root = self.data_dir.join("groups");
        let Ok(names) = self.env.vfs.list_dir(&root) else { return };
        for name in names {
            let Ok(group) = name.parse::<GroupId>() else { continue };
            // The metadata group's log lives beside the partitions' (and no topic holds it).
            if group == eddy_raft::META_GROUP
                || group >= view.state.next_group_id
                || view.partition_of(group).is_some()
                || self.replicas.get(group).is_some()
            {
                continue;
            }
            info!(group, "removing the log and state of a partition whose topic was deleted");
            self.erase_group(group).await;
        }
    }

    /// Tells the other replicas of a damaged replica's group that it does not run: leaders then
    /// do not count it in sync (no leadership is handed to it), and if it led the group before
    /// the node restarted, the followers, which still follow it (its node answers liveness
    /// probes), stop waiting for it and campaign. Its vote is in the log's state file, apart
    /// from the damaged segments. Sent again on every reconciliation (a placement change, which
    /// may add holders), and by liveness to every holder that restarts, since it has forgotten it.
    async fn report_damaged(&self, p: &crate::meta::state::PartitionRecord) {
        let dir = self.data_dir.join("groups").join(p.group_id.to_string());
        let vote = match eddy_raft::log::state_file::StateFile::open(self.env.vfs.as_ref(), &dir).await {
            Ok(f) => f.state().vote,
            Err(e) => {
                warn!(group = p.group_id, "reading the damaged replica's vote: {e}");
                None
            }
        };
        let led = vote.filter(|v| v.is_committed() && v.leader_id().voted_for == self.me);
        let wake = eddy_proto::v1::Wake {
            group_id: p.group_id,
            term: vote.map_or(0, |v| v.leader_id().term),
            leader_lost: led.is_some(),
            damaged: true,
        };
        self.liveness.report_damaged(wake, p.holders());
    }

    /// Tells the other replicas of a group that this node's replica of it runs: a peer that was
    /// told it is damaged (a replica moved away for its damage and placed here again, started
    /// afresh) counts it in sync again. Without it, a leader that had heard of the damage kept
    /// the new replica a learner for good, and the move that brought it back never finished
    /// (simulator seed 92).
    fn report_running(&self, p: &crate::meta::state::PartitionRecord) {
        let wake = eddy_proto::v1::Wake { group_id: p.group_id, term: 0, leader_lost: false, damaged: false };
        self.liveness.request_wake(wake, p.holders());
    }

    /// Stops a replica, keeping its log and state.
    async fn stop_group(&self, g: PartitionHandle) {
        let group = g.group();
        info!(
            group,
            topic = g.topic(),
            partition = g.partition(),
            "stopping a replica this node no longer holds"
        );
        self.replicas.remove(group);
        g.stop_tasks();
        self.registry.remove(group);
        if let Err(e) = g.raft().shutdown().await {
            warn!(group, "stopping the group: {e}");
        }
        // No persist of its state may reach the state store after the tree is dropped.
        g.close_state();
    }

    /// Deletes a stopped replica's log and state.
    async fn delete_group_data(&self, group: GroupId) {
        info!(group, "removing the log and state of a replica this node no longer holds");
        self.erase_group(group).await;
    }

    /// Deletes a group's log and state so that no power loss can leave one without the other: a
    /// state tree that came back beside a new, empty log would index entries the log does not
    /// hold (simulator seed 115 with `move-back`). A durable tombstone (`deleting`) goes into
    /// the log's directory first; the state tree is dropped and the state store flushed; then
    /// the directory goes, durably. A replica that finds the tombstone when it opens finishes
    /// the deletion first (`start_group`). A failure is logged, and the tombstone stays.
    async fn erase_group(&self, group: GroupId) {
        let root = self.data_dir.join("groups");
        let dir = root.join(group.to_string());
        let vfs = &self.env.vfs;
        let result = async {
            vfs.create_dir_all(&dir)?;
            vfs.open(&dir.join(TOMBSTONE), true)?.sync_data().await?;
            vfs.sync_dir(&dir).await?;
            self.env.state_store.drop_tree(&crate::partition::sm::tree_name(group))?;
            self.env.state_store.flush().await?;
            // The files first, made durable by a sync of their directory (the tombstone last),
            // then the directory itself.
            let mut names = vfs.list_dir(&dir)?;
            names.sort_by_key(|n| n == TOMBSTONE);
            for name in names {
                vfs.remove_file(&dir.join(name))?;
            }
            vfs.sync_dir(&dir).await?;
            vfs.remove_dir_all(&dir)?;
            vfs.sync_dir(&root).await?;
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            warn!(group, "deleting the log and state of group {group} in {}: {e}", dir.display());
        }
    }

    async fn start_group(
        &self,
        view: &MetaView,
        topic: &str,
        partition: u32,
        record: &crate::meta::state::PartitionRecord,
        cancel: &CancellationToken,
    ) -> anyhow::Result<PartitionHandle> {
        let (group, initial_replicas) = (record.group_id, &record.initial_replicas[..]);
        // Only a group that never moved may be initialized: a node that an earlier move took
        // the partition from, and a later one brings it back to, opens a pristine replica, and
        // initializing that would found a second, empty group under the same id (simulator
        // seed 88 lost every event of t1/1 that way). A partition moved back to exactly its
        // initial replicas looks unmoved, so a move's end empties `initial_replicas` (seed 9,
        // with `move-back`).
        //
        // A first move that has not ended does not stop the founding: a move planned before the
        // group's replicas first started (a decommission that began as the topic was created)
        // left every initial replica waiting for a membership none had written, and the move
        // never finished (seed 444). Founding during it is safe: until the group has had a
        // leader, it has changed no membership, and it can have had one only once a majority of
        // its initial replicas wrote the initial membership (a replica without a log refuses to
        // vote), so pristine initial replicas are never a majority of a group that moved on.
        let set = |v: &[NodeId]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        let founding = !initial_replicas.is_empty() && set(&record.replicas) == set(initial_replicas);
        // The planted bug: the rule before seed 88, any pristine initial replica founds it, and
        // the rule before seed 9, a move's end keeps the initial replicas. Since a move's end
        // empties them now, a partition that moved takes the replicas it is moving to (when
        // moving, else its replicas) for them: in seeds 88 and 9 those were the initial
        // replicas, the move bringing the partition back to exactly them.
        #[cfg(feature = "planted-bugs")]
        let (founding, initial_replicas) = if self.env.bugs.returning_replica_refounds {
            (true, if initial_replicas.is_empty() { record.desired() } else { initial_replicas })
        } else {
            (founding, initial_replicas)
        };
        if !self.env.replica_open_delay.is_zero() {
            tokio::time::sleep(self.env.replica_open_delay).await;
        }
        let dir = self.data_dir.join("groups").join(group.to_string());
        if self.env.vfs.exists(&dir.join(TOMBSTONE)) {
            // A deletion a crash interrupted: finish it, and open a pristine replica.
            info!(group, "finishing the deletion of this replica's old log and state");
            self.erase_group(group).await;
            anyhow::ensure!(
                !self.env.vfs.exists(&dir.join(TOMBSTONE)),
                "the deletion of group {group}'s old log and state did not finish"
            );
        }
        let segment_bytes_max =
            view.state.topics.get(topic).and_then(|t| t.segment_bytes()).unwrap_or(self.segment_bytes);
        let (log, report) = LogStore::open(
            self.env.vfs.clone(),
            &dir,
            log_config(segment_bytes_max, &self.metrics, &self.storage, &self.env),
        )
        .await
        .with_context(|| format!("open the log of group {group}"))?;
        let pristine = log.is_pristine();
        let reader = log.reader();
        let (sm, progress, index) = PartitionStateMachine::open(self.env.state_store.clone(), group)
            .with_context(|| format!("open the state of group {group}"))?;
        let sm = sm.with_log(reader.clone());
        let network =
            GroupNetwork::new(group, self.me, self.peers.clone()).with_liveness(self.liveness.clone());
        let failed_sessions = network.failed_sessions();
        let raft: PartitionRaft = Runtime::scope(
            group_seed(self.env.seed, group),
            PartitionRaft::new(self.me, raft_config::partition_group(), network, log, sm),
        )
        .await
        .with_context(|| format!("start the Raft node of group {group}"))?;
        // Every initial replica writes the group's first membership before the group can be
        // reached (it is not in the registry yet): a replica that granted a vote before it had
        // any entry could never initialize (openraft refuses once a vote is stored), and if the
        // candidate it voted for died with the only copy of the membership, the group could
        // never elect. All write the same entry (term 0, index 0, the initial replicas).
        if pristine && founding && initial_replicas.contains(&self.me) {
            let members: BTreeMap<NodeId, NodeAddr> = initial_replicas
                .iter()
                .filter_map(|id| view.state.nodes.get(id).map(|n| (*id, n.addr.clone())))
                .collect();
            if members.len() == initial_replicas.len() {
                match Runtime::scope(group_seed(self.env.seed, group), raft.initialize(members)).await {
                    Ok(()) => info!("initialized the partition group"),
                    Err(e) => info!("partition group already initialized: {e}"),
                }
                // Partition groups have no election timer: the preferred leader campaigns at
                // once, and `GroupWatch` covers the others.
                if initial_replicas.first() == Some(&self.me) {
                    let raft = raft.clone();
                    let seed = group_seed(self.env.seed, group);
                    self.tasks.spawn(
                        Runtime::scope(seed, async move {
                            let _ = raft.trigger().elect(true).await;
                        })
                        .in_current_span(),
                    );
                }
            }
        }
        self.registry.insert(group, Arc::new(raft.clone()));
        info!(entries = report.entries, pristine, "partition replica started");
        let handle = PartitionHandle::new(PartitionParts {
            topic: topic.to_owned(),
            partition,
            group,
            me: self.me,
            raft,
            progress,
            index,
            log: reader,
            meta: self.meta.clone(),
            metrics: self.metrics.clone(),
            liveness: self.liveness.clone(),
            stop: cancel.child_token(),
            retention: tokio::sync::watch::Sender::new(
                view.state.topics.get(topic).map(|t| TopicSettings::of(t)).unwrap_or_default(),
            ),
            #[cfg(feature = "planted-bugs")]
            bugs: self.env.bugs,
        });
        let retention = RetentionTask {
            handle: handle.clone(),
            clock: self.retention_clock.clone(),
            interval: self.retention_check_interval,
            segment_bytes_default: self.segment_bytes,
        };
        self.tasks.spawn(retention.run(handle.stop_token()).in_current_span());
        let watch = GroupWatch {
            group,
            raft: handle.raft().clone(),
            liveness: self.liveness.clone(),
            first_leader: initial_replicas.first().copied(),
            failed_sessions,
        };
        self.tasks.spawn(
            Runtime::scope(group_seed(self.env.seed, group), watch.run(handle.stop_token()))
                .in_current_span(),
        );
        Ok(handle)
    }
}
