//! The nemesis of a real-process round: injects faults at seeded random times on real
//! processes, network namespaces and disks, undoes each after its duration, and heals
//! everything when the chaos ends. Every fault is bounded in time.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use eddy_ops::Client;
use nix::sys::signal::Signal;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::hosts::Hosts;
use crate::trace::Trace;
use crate::workload::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RealFault {
    /// The nodes split into two sides whose packets are dropped (nftables in each namespace).
    Partition,
    /// One node's packets to another are dropped; the other's still arrive.
    OneWay,
    /// A partition's leader, or the metadata leader, loses every packet to and from any host.
    IsolateLeader,
    /// A node drops 5-30% of its packets, each way, at random.
    Loss,
    /// A node's outgoing link is throttled to 256 kbit/s with up to 400 ms queued (tc tbf):
    /// slow, not cut. (This kernel has no netem; delay comes from the queue.)
    Slow,
    /// SIGKILL, and a restart when the fault ends.
    Kill,
    /// SIGSTOP of a partition's leader, SIGCONT when the fault ends: a frozen process whose
    /// sockets stay open, the grey failure.
    Pause,
    /// SIGTERM (a graceful stop), and a restart when the fault ends.
    Bounce,
    /// A node's disk (its own tmpfs) filled to 16 MiB short of full, below the node's reserve,
    /// freed when the fault ends.
    DiskFull,
    /// A partition's replicas moved to another set of nodes.
    Move,
    /// A new node joins on a free host.
    Join,
    /// A node is decommissioned: its replicas move away, then it is removed and its host
    /// freed.
    Decommission,
}

impl RealFault {
    pub const ALL: [RealFault; 12] = [
        RealFault::Partition,
        RealFault::OneWay,
        RealFault::IsolateLeader,
        RealFault::Loss,
        RealFault::Slow,
        RealFault::Kill,
        RealFault::Pause,
        RealFault::Bounce,
        RealFault::DiskFull,
        RealFault::Move,
        RealFault::Join,
        RealFault::Decommission,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            RealFault::Partition => "partition",
            RealFault::OneWay => "one-way",
            RealFault::IsolateLeader => "isolate-leader",
            RealFault::Loss => "loss",
            RealFault::Slow => "slow",
            RealFault::Kill => "kill",
            RealFault::Pause => "pause",
            RealFault::Bounce => "bounce",
            RealFault::DiskFull => "disk-full",
            RealFault::Move => "move",
            RealFault::Join => "join",
            RealFault::Decommission => "decommission",
        }
    }

    /// Faults that take a node's process or disk (at most [`IMPAIRED_MAX`] nodes at once, one
    /// such fault per node).
    fn impairs(&self) -> bool {
        matches!(self, Self::Kill | Self::Pause | Self::Bounce | Self::DiskFull | Self::IsolateLeader)
    }
}

/// What a `disk-full` fault leaves available: below the nodes' reserve
/// (`storage_min_free_bytes`, 64 MiB by default), so the node must refuse writes and hand its
/// leaderships over, above zero (see `node/src/disk.rs` for a disk filled to the last byte).
const DISK_FULL_LEAVE: u64 = 16 << 20;
/// At most this many nodes are killed, paused, stopped, isolated or out of disk at once.
const IMPAIRED_MAX: usize = 2;
/// The cluster keeps at least this many members (a decommission waits otherwise) and at most
/// the number of hosts.
const MEMBERS_MIN: usize = 4;

enum Undo {
    Rules,
    Throttle(u64),
    Restart(u64),
    Continue(u64),
    FreeDisk(u64),
    Nothing,
}

struct Active {
    id: u64,
    class: RealFault,
    node: Option<u64>,
    started_at: u64,
    ends_at: u64,
    undo: Undo,
}

pub struct RealNemesis {
    rng: SmallRng,
    /// Per class: (mean gap, min duration, max duration), ms.
    classes: BTreeMap<RealFault, (u64, u64, u64)>,
    next_at: BTreeMap<RealFault, u64>,
    active: Vec<Active>,
    next_fault: u64,
    /// Nodes being decommissioned, retired once the cluster has removed them.
    decommissioning: BTreeSet<u64>,
    trace: Trace,
    pub injected: BTreeMap<RealFault, u32>,
    pub intervals: Vec<(RealFault, u64, u64)>,
    /// Faults that could not be injected or undone, with why (reported, never silent).
    pub errors: Vec<String>,
}

fn exp_gap(rng: &mut SmallRng, mean_ms: u64) -> u64 {
    (-(mean_ms as f64) * (1.0 - rng.random::<f64>()).ln()) as u64
}

impl RealNemesis {
    /// The round's faults: each allowed class is on with probability 1/2 (at least one is),
    /// with its own frequency, as the simulator's swarm profiles.
    pub fn new(seed: u64, allowed: &[RealFault], trace: Trace) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x4a45_5053_454e_0001);
        let mut classes = BTreeMap::new();
        for c in allowed {
            if rng.random_bool(0.5) {
                let max = if *c == RealFault::Pause { 10_000 } else { rng.random_range(2_000..8_000) };
                classes.insert(*c, (rng.random_range(3_000..10_000), 1_000, max));
            }
        }
        if classes.is_empty() && !allowed.is_empty() {
            classes.insert(allowed[rng.random_range(0..allowed.len())], (4_000, 1_000, 6_000));
        }
        let next_at = classes.iter().map(|(c, (gap, ..))| (*c, 3_000 + exp_gap(&mut rng, *gap))).collect();
        Self {
            rng,
            classes,
            next_at,
            active: Vec::new(),
            next_fault: 1,
            decommissioning: BTreeSet::new(),
            trace,
            injected: BTreeMap::new(),
            intervals: Vec::new(),
            errors: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .classes
            .iter()
            .map(|(c, (gap, min, max))| {
                format!(
                    "{} every ~{:.1}s for {:.1}-{:.1}s",
                    c.name(),
                    *gap as f64 / 1e3,
                    *min as f64 / 1e3,
                    *max as f64 / 1e3
                )
            })
            .collect();
        parts.join(", ")
    }

    pub fn classes(&self) -> Vec<&'static str> {
        self.classes.keys().map(RealFault::name).collect()
    }

    fn impaired(&self) -> BTreeSet<u64> {
        self.active.iter().filter(|a| a.class.impairs()).filter_map(|a| a.node).collect()
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.rng.random_range(0..v.len())])
    }

    /// Running members that no other process fault holds.
    fn healthy(&self, hosts: &mut Hosts) -> Vec<u64> {
        let impaired = self.impaired();
        let ids: Vec<u64> = hosts.placement.keys().copied().collect();
        ids.into_iter()
            .filter(|id| !impaired.contains(id) && !self.decommissioning.contains(id))
            .filter(|id| hosts.node(*id).is_some_and(|p| p.running() && !p.paused))
            .collect()
    }

    /// The leader of a random partition of `topics`, or the metadata leader.
    async fn some_leader(&mut self, client: &Client, topics: &[String]) -> Option<u64> {
        let md = tokio::time::timeout(Duration::from_secs(2), client.refresh_metadata()).await.ok()?.ok()?;
        if self.rng.random_bool(0.3) {
            return md.metadata_leader;
        }
        let t = &topics[self.rng.random_range(0..topics.len())];
        let parts = &md.topics.get(t)?.partitions;
        parts.get(self.rng.random_range(0..parts.len().max(1)))?.leader
    }

    /// Injects and undoes what is due at `now`.
    pub async fn tick(&mut self, now: u64, hosts: &mut Hosts, client: &Client, topics: &[String]) {
        hosts.reap();
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].ends_at <= now {
                let a = self.active.swap_remove(i);
                self.undo(now, hosts, a);
            } else {
                i += 1;
            }
        }
        self.retire_removed(hosts, client).await;
        let due: Vec<RealFault> = self.next_at.iter().filter(|(_, t)| **t <= now).map(|(c, _)| *c).collect();
        for class in due {
            let (gap, min, max) = self.classes[&class];
            self.next_at.insert(class, now + exp_gap(&mut self.rng, gap));
            let duration = self.rng.random_range(min..=max.max(min));
            let id = self.next_fault;
            match self.inject(class, id, hosts, client, topics).await {
                Ok(Some((node, undo, what))) => {
                    self.next_fault += 1;
                    *self.injected.entry(class).or_default() += 1;
                    self.trace.push(now, "fault", format!("{} {what} for {duration} ms", class.name()));
                    self.active.push(Active {
                        id,
                        class,
                        node,
                        started_at: now,
                        ends_at: now + duration,
                        undo,
                    });
                }
                Ok(None) => {}
                Err(e) => self.errors.push(format!("{}: {e:#}", class.name())),
            }
        }
    }

    async fn inject(
        &mut self,
        class: RealFault,
        id: u64,
        hosts: &mut Hosts,
        client: &Client,
        topics: &[String],
    ) -> anyhow::Result<Option<(Option<u64>, Undo, String)>> {
        let healthy = self.healthy(hosts);
        let room = self.impaired().len() < IMPAIRED_MAX;
        let ip =
            |hosts: &Hosts, node: u64| hosts.host_of(node).map(|h| hosts.net.addr(h)).unwrap_or_default();
        Ok(match class {
            RealFault::Partition => {
                let mut nodes: Vec<u64> = hosts.members();
                if nodes.len() < 3 {
                    return Ok(None);
                }
                nodes.shuffle(&mut self.rng);
                let k = self.rng.random_range(1..=(nodes.len() - 1) / 2);
                let (a, b) = nodes.split_at(k);
                for (mine, theirs) in [(a, b), (b, a)] {
                    for m in mine {
                        let rules = theirs
                            .iter()
                            .flat_map(|t| {
                                let addr = ip(hosts, *t);
                                [
                                    format!("input ip saddr {addr} drop"),
                                    format!("output ip daddr {addr} drop"),
                                ]
                            })
                            .collect();
                        let h = hosts.host_of(*m).unwrap_or_default();
                        hosts.add_rules(h, id, rules)?;
                    }
                }
                Some((None, Undo::Rules, format!("{a:?} | {b:?}")))
            }
            RealFault::OneWay => {
                let nodes: Vec<u64> = hosts.members();
                let (Some(a), Some(b)) = (self.pick(&nodes), self.pick(&nodes)) else { return Ok(None) };
                if a == b {
                    return Ok(None);
                }
                let h = hosts.host_of(a).unwrap_or_default();
                hosts.add_rules(h, id, vec![format!("output ip daddr {} drop", ip(hosts, b))])?;
                Some((None, Undo::Rules, format!("n{a} -/-> n{b}")))
            }
            RealFault::IsolateLeader => {
                if !room {
                    return Ok(None);
                }
                let Some(leader) = self.some_leader(client, topics).await else { return Ok(None) };
                if !healthy.contains(&leader) {
                    return Ok(None);
                }
                let h = hosts.host_of(leader).unwrap_or_default();
                hosts.add_rules(
                    h,
                    id,
                    vec!["input iifname \"eth0\" drop".into(), "output oifname \"eth0\" drop".into()],
                )?;
                Some((Some(leader), Undo::Rules, format!("n{leader}")))
            }
            RealFault::Loss => {
                let Some(n) = self.pick(&healthy) else { return Ok(None) };
                let p = self.rng.random_range(5..=30);
                let h = hosts.host_of(n).unwrap_or_default();
                hosts.add_rules(
                    h,
                    id,
                    vec![
                        format!("input iifname \"eth0\" numgen random mod 100 < {p} drop"),
                        format!("output oifname \"eth0\" numgen random mod 100 < {p} drop"),
                    ],
                )?;
                Some((None, Undo::Rules, format!("n{n} {p}%")))
            }
            RealFault::Slow => {
                let Some(n) = self.pick(&healthy) else { return Ok(None) };
                let h = hosts.host_of(n).unwrap_or_default();
                if hosts.hosts[h as usize - 1].throttled {
                    return Ok(None);
                }
                hosts.throttle(h, true)?;
                Some((None, Undo::Throttle(h), format!("n{n}")))
            }
            RealFault::Kill | RealFault::Bounce => {
                let Some(n) = self.pick(&healthy).filter(|_| room) else { return Ok(None) };
                hosts.stop(n, class == RealFault::Bounce);
                Some((Some(n), Undo::Restart(n), format!("n{n}")))
            }
            RealFault::Pause => {
                if !room {
                    return Ok(None);
                }
                let Some(leader) = self.some_leader(client, topics).await else { return Ok(None) };
                if !healthy.contains(&leader) {
                    return Ok(None);
                }
                hosts.signal(leader, Signal::SIGSTOP)?;
                Some((Some(leader), Undo::Continue(leader), format!("n{leader} (a leader)")))
            }
            RealFault::DiskFull => {
                let Some(n) = self.pick(&healthy).filter(|_| room) else { return Ok(None) };
                let h = hosts.host_of(n).unwrap_or_default();
                let filled = hosts.fill_disk(h, DISK_FULL_LEAVE)?;
                Some((
                    Some(n),
                    Undo::FreeDisk(h),
                    format!("n{n} ({filled} B of filler, {DISK_FULL_LEAVE} B left)"),
                ))
            }
            RealFault::Move => {
                let t = topics[self.rng.random_range(0..topics.len())].clone();
                let Ok(md) = client.refresh_metadata().await else { return Ok(None) };
                let parts = md.topics.get(&t).map_or(0, |t| t.partitions.len()) as u32;
                if parts == 0 {
                    return Ok(None);
                }
                let p = self.rng.random_range(0..parts);
                let mut members: Vec<u64> =
                    md.nodes.keys().copied().filter(|n| !self.decommissioning.contains(n)).collect();
                members.shuffle(&mut self.rng);
                members.truncate(3);
                members.sort_unstable();
                let r = client.move_partition(&t, p, members.clone()).await;
                Some((
                    None,
                    Undo::Nothing,
                    format!(
                        "{t}/{p} to {members:?}: {}",
                        r.map_or_else(|e| e.to_string(), |()| "started".into())
                    ),
                ))
            }
            RealFault::Join => {
                let Some(h) = hosts.hosts.iter().find(|h| h.node.is_none()).map(|h| h.n) else {
                    return Ok(None);
                };
                let id = hosts.join(h)?;
                Some((None, Undo::Nothing, format!("n{id} on host {h}")))
            }
            RealFault::Decommission => {
                let members = hosts.members().len() - self.decommissioning.len();
                if members <= MEMBERS_MIN {
                    return Ok(None);
                }
                let Some(n) = self.pick(&healthy) else { return Ok(None) };
                match client.set_node_state(n, "decommissioning").await {
                    Ok(_) => {
                        self.decommissioning.insert(n);
                        Some((None, Undo::Nothing, format!("n{n}")))
                    }
                    Err(e) => Some((None, Undo::Nothing, format!("n{n} refused: {e}"))),
                }
            }
        })
    }

    fn undo(&mut self, now: u64, hosts: &mut Hosts, a: Active) {
        let r = match a.undo {
            Undo::Rules => hosts.remove_rules(a.id),
            Undo::Throttle(h) => hosts.throttle(h, false),
            Undo::Restart(n) => hosts.start_node(n),
            Undo::Continue(n) => hosts.signal(n, Signal::SIGCONT),
            Undo::FreeDisk(h) => {
                hosts.free_disk(h);
                Ok(())
            }
            Undo::Nothing => Ok(()),
        };
        if let Err(e) = r {
            self.errors.push(format!("undo {}: {e:#}", a.class.name()));
        }
        self.trace.push(now, "heal", format!("{} #{}", a.class.name(), a.id));
        self.intervals.push((a.class, a.started_at, now));
    }

    /// Retires the nodes whose decommission the cluster finished.
    async fn retire_removed(&mut self, hosts: &mut Hosts, client: &Client) {
        if self.decommissioning.is_empty() {
            return;
        }
        // Several nodes' worth: a node removed but still running answers UNAVAILABLE after
        // about a second (its metadata stopped before its removal), and the client asks the next.
        let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(5), client.list_nodes()).await else {
            return;
        };
        let listed: BTreeMap<u64, String> = list.nodes.into_iter().map(|n| (n.id, n.state)).collect();
        let done: Vec<u64> = self
            .decommissioning
            .iter()
            .copied()
            .filter(|n| listed.get(n).is_none_or(|s| s == "removed"))
            .collect();
        for n in done {
            self.decommissioning.remove(&n);
            hosts.retire(n);
            self.trace.push(now_ms(), "fault", format!("decommission of n{n} done: stopped, host freed"));
        }
    }

    /// Undoes every active fault, then waits (bounded) for moves and decommissions to finish,
    /// so that the audit reads a stable placement.
    pub async fn heal_all(&mut self, hosts: &mut Hosts, client: &Client) {
        let now = now_ms();
        for a in std::mem::take(&mut self.active) {
            self.undo(now, hosts, a);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            self.retire_removed(hosts, client).await;
            let moving = match tokio::time::timeout(Duration::from_secs(2), client.list_moves()).await {
                Ok(Ok(m)) => m.moves.len(),
                _ => 1,
            };
            if self.decommissioning.is_empty() && moving == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                self.errors.push(format!(
                    "{moving} moves and the decommissions of {:?} still running 120 s after healing",
                    self.decommissioning
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.trace.push(now_ms(), "heal", "every fault healed; moves and decommissions done");
    }
}
