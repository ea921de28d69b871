//! The nemesis: injects the faults of the run's profile at random (seeded) times during the
//! chaos phase, undoes each after its duration, and heals everything when the chaos ends.

use std::collections::BTreeMap;
use std::time::Duration;

use eddy_node::meta::state::NodeState;
use eddy_raft::NodeId;
use openraft::async_runtime::WatchReceiver;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::cluster::Cluster;
use crate::cluster::host_name;
use crate::profile::FaultClass;
use crate::profile::Profile;
use crate::trace::Trace;
use crate::workload::AdminOp;
use crate::workload::AdminQueue;

/// Message latency of a healthy link.
pub const BASE_MAX_LATENCY: Duration = Duration::from_millis(2);
/// At most this many nodes are down at once (a minority of five).
const DOWN_MAX: usize = 2;
/// A decommission keeps at least this many members (active or joining).
const MEMBERS_MIN: usize = 4;
/// A move-back's first half: the topic and partition, the nodes it leaves, the replicas it
/// moves to, and the replicas it comes back to.
type MoveAway = (String, u32, Vec<NodeId>, Vec<NodeId>, Vec<NodeId>);

/// The operator asks for a repair of a damaged replica at most this often (simulated ms).
const REPAIR_ASK_GAP_MS: u64 = 5_000;
/// At most this many nodes join in a run.
const JOINS_MAX: usize = 3;

enum Undo {
    Repair(Vec<(String, String)>),
    RepairOneWay(String, String),
    LinkLoss(String, String),
    LinkLatency(String, String),
    Release(Vec<(String, String)>),
    Restart(NodeId),
    /// The node's disk has room again.
    FreeDisk(NodeId),
    /// A membership change: nothing to undo (the cluster carries it out).
    Nothing,
    /// The node's disk syncs again; its machine restarts, losing what was not durable.
    SyncAgain(NodeId),
    /// Disk corruption: the operator moves the damaged replica of `group` off `node` once the
    /// node reports it damaged, until it is gone (see [`Nemesis::repair_damage`]).
    MoveDamaged {
        node: NodeId,
        group: eddy_raft::GroupId,
        tries: u32,
        asked_at: Option<u64>,
    },
    /// A partition moved off a node goes back to `replicas` (retried every second while a move
    /// of it is still under way, for at most a minute).
    MoveBack {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
        tries: u32,
    },
    /// The node's wall clock is set right again.
    SetClock(NodeId),
    /// Silent death: crash at `crash_at`, then restart (and repair) at the end.
    CrashThenRestart {
        node: NodeId,
        crash_at: u64,
        crashed: bool,
        pairs: Vec<(String, String)>,
    },
}

struct Active {
    class: FaultClass,
    started_at: u64,
    ends_at: u64,
    undo: Undo,
}

pub struct Nemesis {
    profile: Profile,
    rng: SmallRng,
    /// The random streams of the classes in `FaultClass::OWN_STREAM`.
    own: BTreeMap<FaultClass, SmallRng>,
    next_at: BTreeMap<FaultClass, u64>,
    active: Vec<Active>,
    /// Every host: nodes and clients.
    hosts: Vec<String>,
    /// How many faults of each class were injected.
    pub injected: BTreeMap<FaultClass, u32>,
    /// Every fault that ended: (class, from, to), simulated ms; for the reports' shading.
    pub intervals: Vec<(FaultClass, u64, u64)>,
    /// Moves and decommissions, carried out by the operator client.
    pub admin: AdminQueue,
    /// The node held down through the last writes: never decommissioned.
    held_down: NodeId,
    joined: usize,
    /// Nodes the nemesis asked to decommission: they count as leaving before the cluster
    /// says so.
    leaving: std::collections::BTreeSet<NodeId>,
    /// Removed nodes whose hosts run on (the `linger` class).
    pub lingering: std::collections::BTreeSet<NodeId>,
}

impl Nemesis {
    pub fn new(profile: Profile, seed: u64, hosts: Vec<String>, held_down: NodeId) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x4e4e_4e4e_0000_0002);
        let mut own: BTreeMap<FaultClass, SmallRng> = FaultClass::OWN_STREAM
            .iter()
            .map(|c| (*c, SmallRng::seed_from_u64(seed ^ 0x4e4e_4e4e_0000_0100 ^ *c as u64)))
            .collect();
        let next_at = profile
            .classes
            .iter()
            .filter(|(c, _)| !FaultClass::MODIFIERS.contains(c))
            .map(|(c, s)| (*c, 3_000 + exp_gap(own.get_mut(c).unwrap_or(&mut rng), s.mean_gap_ms)))
            .collect();
        Self {
            profile,
            rng,
            own,
            next_at,
            active: Vec::new(),
            hosts,
            injected: BTreeMap::new(),
            intervals: Vec::new(),
            admin: AdminQueue::default(),
            held_down,
            joined: 0,
            leaving: Default::default(),
            lingering: Default::default(),
        }
    }

    /// Injects and undoes faults due at `now` (simulated ms).
    pub fn tick(&mut self, now: u64, sim: &mut turmoil::Sim<'_>, cluster: &mut Cluster, trace: &Trace) {
        // Undo what has run its course (and crash silent deaths whose moment has come).
        let mut i = 0;
        while i < self.active.len() {
            if let Undo::CrashThenRestart { node, crash_at, crashed, .. } = &mut self.active[i].undo
                && !*crashed
                && now >= *crash_at
            {
                *crashed = true;
                let node = *node;
                self.crash(now, sim, cluster, trace, node, true);
            }
            if self.active[i].ends_at <= now {
                let a = self.active.swap_remove(i);
                self.undo(now, sim, cluster, trace, a);
            } else {
                i += 1;
            }
        }
        let due: Vec<FaultClass> = self.next_at.iter().filter(|(_, t)| **t <= now).map(|(c, _)| *c).collect();
        for class in due {
            let s = self.profile.classes[&class];
            let rng = self.own.get_mut(&class).unwrap_or(&mut self.rng);
            let next = now + exp_gap(rng, s.mean_gap_ms);
            let duration = rng.random_range(s.min_duration_ms..=s.max_duration_ms.max(s.min_duration_ms));
            self.next_at.insert(class, next);
            if let Some(undo) = self.inject(now, class, duration, sim, cluster, trace) {
                *self.injected.entry(class).or_default() += 1;
                self.active.push(Active { class, started_at: now, ends_at: now + duration, undo });
            }
        }
    }

    fn nodes_up(cluster: &Cluster) -> Vec<NodeId> {
        cluster.nodes.values().filter(|s| s.up).map(|s| s.id).collect()
    }

    /// Every link between node `n` and another host.
    fn links_of(&self, n: NodeId) -> Vec<(String, String)> {
        let me = host_name(n);
        self.hosts.iter().filter(|h| **h != me).map(|h| (me.clone(), h.clone())).collect()
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.rng.random_range(0..v.len())])
    }

    /// A leader to isolate: the metadata leader or, as often, a random partition's leader.
    fn some_leader(&mut self, cluster: &Cluster) -> Option<NodeId> {
        let up = Self::nodes_up(cluster);
        let refs: Vec<_> = up.iter().filter_map(|id| cluster.refs(*id).map(|r| (*id, r))).collect();
        if self.rng.random_bool(0.5) {
            refs.iter().find_map(|(_, r)| r.meta.leader())
        } else {
            let mut leaders: Vec<NodeId> = Vec::new();
            for (id, r) in &refs {
                for g in r.replicas.all() {
                    if g.raft().metrics().borrow_watched().current_leader == Some(*id) {
                        leaders.push(*id);
                    }
                }
            }
            self.pick(&leaders)
        }
    }

    fn inject(
        &mut self,
        now: u64,
        class: FaultClass,
        duration: u64,
        sim: &mut turmoil::Sim<'_>,
        cluster: &mut Cluster,
        trace: &Trace,
    ) -> Option<Undo> {
        let up = Self::nodes_up(cluster);
        let all: Vec<NodeId> = cluster.live_ids();
        let mut desc;
        let undo = match class {
            FaultClass::Partition => {
                let mut nodes = all.clone();
                nodes.shuffle(&mut self.rng);
                let cut = self.rng.random_range(1..nodes.len());
                let (a, b) = nodes.split_at(cut);
                let pairs: Vec<(String, String)> =
                    a.iter().flat_map(|x| b.iter().map(move |y| (host_name(*x), host_name(*y)))).collect();
                for (x, y) in &pairs {
                    sim.partition(x.as_str(), y.as_str());
                }
                desc = format!("{a:?} | {b:?}");
                Undo::Repair(pairs)
            }
            FaultClass::OneWay => {
                let a = self.pick(&all)?;
                let others: Vec<NodeId> = all.iter().copied().filter(|n| *n != a).collect();
                let b = self.pick(&others)?;
                sim.partition_oneway(host_name(a), host_name(b));
                desc = format!("n{a} -/-> n{b}");
                Undo::RepairOneWay(host_name(a), host_name(b))
            }
            FaultClass::IsolateLeader => {
                let leader = self.some_leader(cluster)?;
                let pairs = self.links_of(leader);
                for (x, y) in &pairs {
                    sim.partition(x.as_str(), y.as_str());
                }
                desc = format!("leader n{leader} cut off");
                Undo::Repair(pairs)
            }
            FaultClass::Loss => {
                let a = self.pick(&all)?;
                let others: Vec<NodeId> = all.iter().copied().filter(|n| *n != a).collect();
                let b = self.pick(&others)?;
                let rate = self.rng.random_range(0.02..0.3);
                sim.set_link_fail_rate(host_name(a), host_name(b), rate);
                desc = format!("n{a} <-> n{b} drops {:.0}% of messages", rate * 100.0);
                Undo::LinkLoss(host_name(a), host_name(b))
            }
            FaultClass::Latency => {
                let a = self.pick(&all)?;
                let others: Vec<NodeId> = all.iter().copied().filter(|n| *n != a).collect();
                let b = self.pick(&others)?;
                let ms = self.rng.random_range(20..600);
                sim.set_link_max_message_latency(host_name(a), host_name(b), Duration::from_millis(ms));
                desc = format!("n{a} <-> n{b} up to {ms} ms");
                Undo::LinkLatency(host_name(a), host_name(b))
            }
            FaultClass::Freeze => {
                let n = self.pick(&up)?;
                let pairs = self.links_of(n);
                for (x, y) in &pairs {
                    sim.hold(x.as_str(), y.as_str());
                }
                desc = format!("n{n} frozen (its messages held, not lost)");
                Undo::Release(pairs)
            }
            FaultClass::DiskFull => {
                let n = self.pick(&up)?;
                let disk = &cluster.nodes[&n].disk;
                let used = disk.bytes() as u64;
                disk.set_capacity(Some(used));
                desc = format!("n{n}'s disk full ({used} bytes used, none left)");
                Undo::FreeDisk(n)
            }
            FaultClass::Move => {
                let view = Self::latest_view(cluster)?;
                let parts: Vec<(String, u32)> = view
                    .state
                    .topics
                    .values()
                    .flat_map(|t| (0..t.partitions.len() as u32).map(|p| (t.name.clone(), p)))
                    .collect();
                let (topic, partition) = parts.get(self.rng.random_range(0..parts.len().max(1)))?.clone();
                let mut members = active_members(&view);
                members.shuffle(&mut self.rng);
                members.truncate(3);
                members.sort_unstable();
                desc = format!("{topic}/{partition} to {members:?}");
                self.admin.lock().expect("admin queue lock").push_back(AdminOp::Move {
                    topic,
                    partition,
                    replicas: members,
                });
                Undo::Nothing
            }
            FaultClass::Join => {
                if self.joined >= JOINS_MAX {
                    return None;
                }
                self.joined += 1;
                let id = cluster.join(sim);
                self.hosts.push(host_name(id));
                desc = format!("n{id} joins");
                Undo::Nothing
            }
            FaultClass::Decommission => {
                let view = Self::latest_view(cluster)?;
                let active: Vec<NodeId> = view
                    .state
                    .nodes
                    .iter()
                    .filter(|(id, n)| {
                        matches!(n.state, NodeState::Active | NodeState::Draining)
                            && !self.leaving.contains(id)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if active.len() <= MEMBERS_MIN {
                    return None;
                }
                let candidates: Vec<NodeId> =
                    active.iter().copied().filter(|n| *n != self.held_down && up.contains(n)).collect();
                let n = self.pick(&candidates)?;
                desc = format!("n{n}");
                self.leaving.insert(n);
                self.admin.lock().expect("admin queue lock").push_back(AdminOp::Decommission(n));
                Undo::Nothing
            }
            FaultClass::FsyncFail => {
                let failing = self.active.iter().filter(|a| matches!(a.undo, Undo::SyncAgain(_))).count();
                if cluster.down().len() + failing >= DOWN_MAX {
                    return None;
                }
                // A leader when there is one: its writes are the ones acknowledged.
                let n = self.some_leader(cluster).or_else(|| self.pick(&up))?;
                cluster.nodes[&n].disk.set_fsync_fails(true);
                desc = format!("n{n}'s disk fails every sync");
                Undo::SyncAgain(n)
            }
            FaultClass::DiskCorrupt | FaultClass::StateCorrupt => {
                let (n, group, what) = self.corrupt_some_replica(cluster, class)?;
                // The node's process restarts, so that its recovery (or its state's check when
                // the replica opens) meets the damage.
                cluster.crash(sim, n, None, false);
                cluster.restart(sim, n);
                desc = format!("n{n}: {what} (group {group}), and its process restarts");
                Undo::MoveDamaged { node: n, group, tries: 0, asked_at: None }
            }
            FaultClass::MoveBack => {
                let (topic, partition, from, away, back) = self.move_away(cluster)?;
                desc = format!("{topic}/{partition} off {from:?} to {away:?}, back to {back:?} at the end");
                self.admin.lock().expect("admin queue lock").push_back(AdminOp::Move {
                    topic: topic.clone(),
                    partition,
                    replicas: away,
                });
                Undo::MoveBack { topic, partition, replicas: back, tries: 0 }
            }
            FaultClass::ClockJump => {
                // Drawn from the class's own stream. One wrong clock at a time.
                if self.active.iter().any(|a| matches!(a.undo, Undo::SetClock(_))) {
                    return None;
                }
                let mut rng = self.own.remove(&FaultClass::ClockJump).expect("clock-jump has its own stream");
                let picked = (!up.is_empty()).then(|| {
                    let n = up[rng.random_range(0..up.len())];
                    // One to 72 hours, forward or backward.
                    let ms = rng.random_range(3_600_000_i64..=259_200_000);
                    let jump = if rng.random_bool(0.5) { ms } else { -ms };
                    // Half the time the process restarts on the wrong clock, as on a machine
                    // that boots before NTP has set its clock: nothing local can tell then
                    // (simulator seed 485).
                    (n, jump, rng.random_bool(0.5))
                });
                self.own.insert(FaultClass::ClockJump, rng);
                let (n, jump, restart) = picked?;
                cluster.nodes[&n].clock_offset.store(jump, std::sync::atomic::Ordering::Relaxed);
                desc = format!("n{n}'s clock jumps {:+.1} h", jump as f64 / 3_600_000.0);
                if restart {
                    cluster.restart(sim, n);
                    desc.push_str(", and its process restarts on it");
                }
                Undo::SetClock(n)
            }
            // Never scheduled (see `retire_removed`).
            FaultClass::Linger => return None,
            FaultClass::Crash | FaultClass::Bounce | FaultClass::SilentDeath => {
                if cluster.down().len() >= DOWN_MAX
                    || self
                        .active
                        .iter()
                        .any(|a| matches!(a.undo, Undo::CrashThenRestart { crashed: false, .. }))
                {
                    return None;
                }
                let n = self.pick(&up)?;
                match class {
                    FaultClass::Crash => {
                        self.crash(now, sim, cluster, trace, n, true);
                        desc = format!("n{n} loses power");
                        Undo::Restart(n)
                    }
                    FaultClass::Bounce => {
                        self.crash(now, sim, cluster, trace, n, false);
                        desc = format!("n{n} process restarts");
                        Undo::Restart(n)
                    }
                    _ => {
                        let pairs = self.links_of(n);
                        for (x, y) in &pairs {
                            sim.partition(x.as_str(), y.as_str());
                        }
                        desc = format!("n{n} goes silent, then loses power");
                        let crash_at = now + self.rng.random_range(100..duration.max(101));
                        Undo::CrashThenRestart { node: n, crash_at, crashed: false, pairs }
                    }
                }
            }
        };
        trace.push(now, "fault", format!("{class}: {desc} for {duration} ms"));
        Some(undo)
    }

    /// Flips a byte of a partition replica's durable data on a running node: for `disk-corrupt`,
    /// a byte of a frame in its log with an intact frame after it, so that no recovery can take
    /// the damage for a torn write; for `state-corrupt`, a byte of a value in its state-store
    /// tree. At most one such damage at a time (of either class), and only while no other node
    /// is down, so that every group keeps a quorum of healthy replicas to repair from. Drawn
    /// from the class's own stream. Returns the node, the group and what was flipped.
    fn corrupt_some_replica(
        &mut self,
        cluster: &Cluster,
        class: FaultClass,
    ) -> Option<(NodeId, eddy_raft::GroupId, String)> {
        use eddy_raft::log::frame;
        use eddy_raft::vfs::Vfs;
        if !cluster.down().is_empty()
            || self.active.iter().any(|a| matches!(a.undo, Undo::MoveDamaged { .. }))
            || cluster
                .live_ids()
                .iter()
                .any(|id| cluster.refs(*id).is_some_and(|r| !r.replicas.damaged().is_empty()))
        {
            return None;
        }
        let mut rng = self.own.remove(&class).expect("the corrupting classes have their own streams");
        let picked = (|| {
            let up: Vec<NodeId> =
                Self::nodes_up(cluster).into_iter().filter(|n| cluster.refs(*n).is_some()).collect();
            let n = *up.get(rng.random_range(0..up.len().max(1)))?;
            // A replica of a partition that is not moving: damage to a learner that a move is
            // filling would leave the move waiting for it (an operator cancels that move first;
            // the nemesis's operator does not).
            let refs = cluster.refs(n)?;
            let view = Self::latest_view(cluster)?;
            let groups: Vec<eddy_raft::GroupId> = refs
                .replicas
                .all()
                .iter()
                .map(|g| g.group())
                .filter(|g| view.partition_of(*g).is_some_and(|(_, _, p)| p.target.is_none()))
                .collect();
            let group = *groups.get(rng.random_range(0..groups.len().max(1)))?;
            let slot = &cluster.nodes[&n];
            if class == FaultClass::StateCorrupt {
                // Any byte of any value the tree holds durably (and reads the same now), the
                // tree's format record included.
                let tree = eddy_node::partition::sm::tree_name(group);
                let entries = slot.store.durable_entries(&tree);
                let (key, value) = entries.get(rng.random_range(0..entries.len().max(1)))?;
                let at = rng.random_range(0..value.len().max(1));
                let xor = rng.random_range(1..=255u8);
                return slot.store.corrupt(&tree, key, at, xor).then(|| {
                    (
                        n,
                        group,
                        format!("byte {at} of the value of key {key:02x?} in state tree {tree} flipped"),
                    )
                });
            }
            let disk = &slot.disk;
            let dir = std::path::PathBuf::from(format!("/data/n{n}/groups/{group}"));
            let mut names = disk.list_dir(&dir).ok()?;
            names.sort();
            // Every frame followed by a whole, intact frame, in the durable contents.
            let mut candidates: Vec<(std::path::PathBuf, usize, usize)> = Vec::new();
            for name in names.iter().filter(|n| n.ends_with(".seg")) {
                let path = dir.join(name);
                let Some(data) = disk.durable_contents(&path) else { continue };
                let data = bytes::Bytes::from(data);
                let mut pos = 0;
                let mut prev: Option<(usize, usize)> = None;
                while let Ok((_, len)) = frame::decode(&data.slice(pos..)) {
                    if let Some((p, l)) = prev {
                        candidates.push((path.clone(), p, l));
                    }
                    prev = Some((pos, len));
                    pos += len;
                }
            }
            let (path, start, len) = candidates.get(rng.random_range(0..candidates.len().max(1)))?.clone();
            let at = start + rng.random_range(0..len);
            let xor = rng.random_range(1..=255u8);
            disk.corrupt(&path, at, xor)
                .then(|| (n, group, format!("byte {at} of {} flipped", path.display())))
        })();
        self.own.insert(class, rng);
        picked
    }

    /// A partition that is not moving, the replicas' nodes it leaves (a majority, as spare
    /// active members allow), its replicas with those replaced by spares (the move away), and
    /// as they are (the move back). Drawn from the `move-back` stream.
    fn move_away(&mut self, cluster: &Cluster) -> Option<MoveAway> {
        let view = Self::latest_view(cluster)?;
        let mut rng = self.own.remove(&FaultClass::MoveBack).expect("move-back has its own stream");
        let picked = (|| {
            let active = active_members(&view);
            let parts: Vec<(String, u32, Vec<NodeId>)> = view
                .state
                .topics
                .values()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.target.is_none())
                        .map(|(i, p)| (t.name.clone(), i as u32, p.replicas.clone()))
                })
                .filter(|(_, _, r)| r.iter().all(|n| active.contains(n)))
                .collect();
            let (topic, partition, back) = parts.get(rng.random_range(0..parts.len().max(1)))?.clone();
            // A majority of the replicas leaves when spares allow: those then return pristine
            // together, able to form a quorum of their own if anything let them.
            let mut leaving = back.clone();
            leaving.shuffle(&mut rng);
            let mut spare: Vec<NodeId> = active.iter().copied().filter(|n| !back.contains(n)).collect();
            spare.shuffle(&mut rng);
            leaving.truncate((back.len() / 2 + 1).min(spare.len()));
            if leaving.is_empty() {
                return None;
            }
            let away: Vec<NodeId> =
                back.iter().map(|n| leaving.iter().position(|l| l == n).map_or(*n, |i| spare[i])).collect();
            Some((topic, partition, leaving, away, back))
        })();
        self.own.insert(FaultClass::MoveBack, rng);
        picked
    }

    /// The operator's answer to a damaged replica, looked at every second until the replica is
    /// gone: once `node` reports `group` damaged and no move of the partition is under way,
    /// the operator moves it to its other active replicas and one more active member. Returns
    /// whether there is nothing more to do: the replica was moved away, or it runs (the damage
    /// went unnoticed: a planted bug).
    fn repair_damage(
        &mut self,
        cluster: &Cluster,
        node: NodeId,
        group: eddy_raft::GroupId,
        trace: &Trace,
        now: u64,
        asked_at: &mut Option<u64>,
    ) -> bool {
        let Some(refs) = cluster.refs(node) else { return false };
        if !refs.replicas.damaged().contains_key(&group) {
            // Not reported: the node is still starting, or a move took the replica away, or the
            // damage went unnoticed.
            return refs.replicas.all().iter().any(|g| g.group() == group)
                || refs.meta.view().partition_of(group).is_none_or(|(_, _, p)| !p.is_holder(node));
        }
        let queued = self
            .admin
            .lock()
            .expect("admin queue lock")
            .iter()
            .any(|op| matches!(op, AdminOp::Repair { .. }));
        let Some(view) = Self::latest_view(cluster) else { return false };
        let Some((topic, partition, record)) = view.partition_of(group) else { return true };
        if !record.is_holder(node) {
            // Moved away; the node deletes the data once its own view says so.
            return true;
        }
        // One request at a time: the operator may still be carrying out the last one (a move
        // request can take its full deadline when the metadata group is slow).
        if queued || record.target.is_some() || asked_at.is_some_and(|at| now < at + REPAIR_ASK_GAP_MS) {
            return false;
        }
        *asked_at = Some(now);
        let active = |id: &NodeId| view.state.nodes.get(id).is_some_and(|n| n.state == NodeState::Active);
        let mut replicas: Vec<NodeId> =
            record.replicas.iter().copied().filter(|r| *r != node && active(r)).collect();
        let mut spare: Vec<NodeId> = view
            .state
            .nodes
            .keys()
            .copied()
            .filter(|id| *id != node && active(id) && !replicas.contains(id))
            .collect();
        let own = self.own.get_mut(&FaultClass::DiskCorrupt).expect("disk-corrupt has its own stream");
        spare.shuffle(own);
        while replicas.len() < record.replicas.len() {
            let Some(s) = spare.pop() else { break };
            replicas.push(s);
        }
        replicas.sort_unstable();
        let topic = topic.name.clone();
        trace.push(
            now,
            "fault",
            format!("n{node} reports group {group} damaged: moving {topic}/{partition} to {replicas:?}"),
        );
        self.admin.lock().expect("admin queue lock").push_back(AdminOp::Repair {
            topic,
            partition,
            replicas,
        });
        false
    }

    fn crash(
        &mut self,
        now: u64,
        sim: &mut turmoil::Sim<'_>,
        cluster: &mut Cluster,
        trace: &Trace,
        n: NodeId,
        lose: bool,
    ) {
        let torn = self.profile.torn_writes;
        let mut rng = SmallRng::seed_from_u64(self.rng.random());
        let mut pick = move |len: usize| rng.random_range(0..=len);
        if lose {
            cluster.crash(sim, n, Some(&mut pick), torn);
            trace.push(
                now,
                "crash",
                format!("n{n} (unsynced writes lost{})", if torn { ", last write may tear" } else { "" }),
            );
        } else {
            cluster.crash(sim, n, None, false);
            trace.push(now, "crash", format!("n{n} (process only)"));
        }
    }

    fn undo(
        &mut self,
        now: u64,
        sim: &mut turmoil::Sim<'_>,
        cluster: &mut Cluster,
        trace: &Trace,
        a: Active,
    ) {
        match a.undo {
            Undo::Repair(pairs) => {
                for (x, y) in &pairs {
                    sim.repair(x.as_str(), y.as_str());
                }
            }
            Undo::RepairOneWay(x, y) => sim.repair_oneway(x.as_str(), y.as_str()),
            Undo::Release(pairs) => {
                for (x, y) in &pairs {
                    sim.release(x.as_str(), y.as_str());
                }
            }
            Undo::LinkLoss(x, y) => sim.set_link_fail_rate(x.as_str(), y.as_str(), 0.0),
            Undo::LinkLatency(x, y) => {
                sim.set_link_max_message_latency(x.as_str(), y.as_str(), BASE_MAX_LATENCY)
            }
            Undo::Restart(n) => {
                cluster.restart(sim, n);
                trace.push(now, "restart", format!("n{n}"));
            }
            Undo::FreeDisk(n) => cluster.nodes[&n].disk.set_capacity(None),
            Undo::SetClock(n) => {
                cluster.nodes[&n].clock_offset.store(0, std::sync::atomic::Ordering::Relaxed)
            }
            Undo::Nothing => {}
            Undo::SyncAgain(n) => {
                cluster.nodes[&n].disk.set_fsync_fails(false);
                // The machine restarts whether or not the process still runs (another fault may
                // have stopped it): after a failed sync the page cache may hold writes the disk
                // never got, and only a reboot (or dropping the cache) shows the process the
                // disk as it is. A process merely restarted would recover from those cached
                // writes and sync after them, leaving a hole for the next power loss to expose.
                self.crash(now, sim, cluster, trace, n, true);
                cluster.restart(sim, n);
                trace.push(now, "restart", format!("n{n} (its disk replaced)"));
            }
            Undo::MoveDamaged { node, group, tries, mut asked_at } => {
                // Looked at again every second until the damaged replica is gone (for at most two
                // minutes: the verifier then reports the partition).
                if !self.repair_damage(cluster, node, group, trace, now, &mut asked_at) && tries < 120 {
                    self.active.push(Active {
                        class: a.class,
                        started_at: a.started_at,
                        ends_at: now + 1_000,
                        undo: Undo::MoveDamaged { node, group, tries: tries + 1, asked_at },
                    });
                    return;
                }
            }
            Undo::MoveBack { topic, partition, replicas, tries } => {
                // The move back waits for the move away (or any other move) to finish; it is
                // dropped if a node it needs is no longer active.
                let view = Self::latest_view(cluster);
                let record = view.as_ref().and_then(|v| {
                    let t = v.state.topics.get(&topic)?;
                    let active = replicas
                        .iter()
                        .all(|n| v.state.nodes.get(n).is_some_and(|r| r.state == NodeState::Active));
                    Some((t.partitions.get(partition as usize)?.target.is_some(), active))
                });
                match record {
                    Some((false, true)) => {
                        trace.push(
                            now,
                            "fault",
                            format!("move-back: {topic}/{partition} back to {replicas:?}"),
                        );
                        self.admin.lock().expect("admin queue lock").push_back(AdminOp::Move {
                            topic,
                            partition,
                            replicas,
                        });
                    }
                    Some((_, false)) | None => {}
                    Some((true, true)) if tries >= 60 => {}
                    Some((true, true)) => {
                        self.active.push(Active {
                            class: a.class,
                            started_at: a.started_at,
                            ends_at: now + 1_000,
                            undo: Undo::MoveBack { topic, partition, replicas, tries: tries + 1 },
                        });
                        return;
                    }
                }
            }
            Undo::CrashThenRestart { node, crashed, pairs, .. } => {
                if !crashed {
                    self.crash(now, sim, cluster, trace, node, true);
                }
                for (x, y) in &pairs {
                    sim.repair(x.as_str(), y.as_str());
                }
                cluster.restart(sim, node);
                trace.push(now, "restart", format!("n{node}"));
            }
        }
        trace.push(now, "heal", format!("{} ended", a.class));
        self.intervals.push((a.class, a.started_at, now));
    }

    /// Whether the operator still has work coming from the nemesis: a repair of a damaged
    /// replica still to be decided on, a move back waiting for the move away to end, or an
    /// operation queued.
    pub fn admin_pending(&self) -> bool {
        self.active.iter().any(|a| matches!(a.undo, Undo::MoveDamaged { .. } | Undo::MoveBack { .. }))
            || !self.admin.lock().expect("admin queue lock").is_empty()
    }

    /// The metadata view of the running node that has applied the most.
    fn latest_view(cluster: &Cluster) -> Option<std::sync::Arc<eddy_node::meta::sm::MetaView>> {
        Self::nodes_up(cluster)
            .into_iter()
            .filter_map(|id| cluster.refs(id).map(|r| r.meta.view()))
            .max_by_key(|v| v.last_applied.map(|l| l.index))
    }

    /// Switches off the hosts of nodes that the cluster has removed (as any running node's
    /// metadata says: its view holds only committed changes), or, with the `linger` class,
    /// leaves them running for the rest of the run. Runs through the whole run, the heal
    /// included: a decommission may finish after it.
    pub fn retire_removed(
        &mut self,
        now: u64,
        sim: &mut turmoil::Sim<'_>,
        cluster: &mut Cluster,
        trace: &Trace,
    ) {
        let mut removed = std::collections::BTreeSet::new();
        for id in Self::nodes_up(cluster) {
            if let Some(r) = cluster.refs(id) {
                let view = r.meta.view();
                removed.extend(
                    view.state.nodes.iter().filter(|(_, n)| n.state == NodeState::Removed).map(|(id, _)| *id),
                );
            }
        }
        let linger = self.profile.classes.contains_key(&FaultClass::Linger);
        for id in removed {
            if cluster.nodes.get(&id).is_none_or(|s| s.retired) || self.lingering.contains(&id) {
                continue;
            }
            if linger {
                self.lingering.insert(id);
                *self.injected.entry(FaultClass::Linger).or_default() += 1;
                trace.push(now, "fault", format!("decommission of n{id} done: host left running (linger)"));
            } else {
                cluster.retire(sim, id);
                trace.push(now, "fault", format!("decommission of n{id} done: host switched off"));
            }
        }
    }

    /// Ends every fault: repairs every link, resets loss and latency, restarts every node.
    pub fn heal_all(&mut self, now: u64, sim: &mut turmoil::Sim<'_>, cluster: &mut Cluster, trace: &Trace) {
        for a in std::mem::take(&mut self.active) {
            self.undo(now, sim, cluster, trace, a);
        }
        for (i, x) in self.hosts.iter().enumerate() {
            for y in &self.hosts[i + 1..] {
                sim.release(x.as_str(), y.as_str());
                sim.repair(x.as_str(), y.as_str());
                sim.set_link_fail_rate(x.as_str(), y.as_str(), 0.0);
                sim.set_link_max_message_latency(x.as_str(), y.as_str(), BASE_MAX_LATENCY);
            }
        }
        for n in cluster.down() {
            cluster.restart(sim, n);
            trace.push(now, "restart", format!("n{n}"));
        }
        self.next_at.clear();
        trace.push(now, "heal", "all faults healed");
    }
}

/// The members a view shows active, by id.
fn active_members(view: &eddy_node::meta::sm::MetaView) -> Vec<NodeId> {
    view.state.nodes.iter().filter(|(_, n)| n.state == NodeState::Active).map(|(id, _)| *id).collect()
}

/// An exponentially distributed gap with the given mean.
fn exp_gap(rng: &mut SmallRng, mean_ms: u64) -> u64 {
    (-(mean_ms as f64) * (1.0 - rng.random::<f64>()).ln()) as u64
}
