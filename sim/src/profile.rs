//! Which faults a run injects and how often, drawn from its seed ("swarm testing": each seed
//! explores its own mix of faults rather than every seed a bit of everything).

use std::collections::BTreeMap;
use std::fmt;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultClass {
    /// The nodes split into two sides that cannot talk.
    Partition,
    /// One node cannot reach another, while the other still reaches it.
    OneWay,
    /// The metadata leader or a partition leader is cut off from every other host.
    IsolateLeader,
    /// A link drops bursts of messages.
    Loss,
    /// A link delays messages by up to hundreds of milliseconds.
    Latency,
    /// A node loses power: its host stops and its disk loses what was not synced; it comes back later.
    Crash,
    /// A node is cut off, then loses power, so that no peer sees its connections close.
    SilentDeath,
    /// A node's process restarts; its disk keeps everything.
    Bounce,
    /// Every message to and from a node is held (none lost) and delivered when the fault ends:
    /// to its peers the node is frozen, alive at the TCP level and silent, as under SIGSTOP.
    Freeze,
    /// A node's disk is full (no write may grow a file) until the fault ends: it must refuse
    /// writes with `disk_full`, hand its leaderships over, keep serving reads, and take writes
    /// again once space is freed, losing nothing.
    DiskFull,
    /// A partition moves to three random members (a replica added, caught up, another removed)
    /// while the other faults go on.
    Move,
    /// A new node joins the running cluster on a new host.
    Join,
    /// A member is decommissioned: its replicas move away, the cluster removes it, and its
    /// host is switched off for good. At least four members stay.
    Decommission,
    /// A node's disk fails every sync (`EIO`), dropping what it was to persist, as Linux does.
    /// The node must stop rather than retry; when the fault ends its machine restarts (losing
    /// what was not durable) and it recovers from its disk and its peers.
    FsyncFail,
    /// A byte of a frame inside a partition replica's log (one with intact frames after it, on
    /// the durable disk) is flipped, and the node's process restarts. Recovery must refuse the
    /// log (a corrupt record is never served, and never cut like a torn tail), the node must
    /// report the replica damaged and serve its others, and when the operator moves the damaged
    /// replica away the group must fill its new one from the healthy replicas, losing nothing.
    DiskCorrupt,
    /// An operator moves a partition off a majority of its replicas' nodes and, when the fault
    /// ends, moves it back to the replicas it had: the returning nodes must take fresh replicas
    /// that join the running group, and the group must not count what their old logs held
    /// (simulator seeds 37 and 88).
    MoveBack,
    /// A running node's wall clock jumps forward or backward by hours or days, and is set right
    /// when the fault ends (or when the machine reboots); half the time its process restarts
    /// on the wrong clock, as on a machine that boots before NTP has set it. Topics get
    /// time-based retention (`retention.ms` of an hour, which no run lasts): a leader whose
    /// clock is ahead must not purge what is younger than that, and nothing may be lost or
    /// reordered.
    ClockJump,
    /// A decommissioned node's host is not switched off when the cluster removes it: it runs on
    /// with the last view it applied, and clients whose bootstrap list names it still reach it,
    /// as when an operator switches a machine off late (the jepsen runner's rounds 16, 23, 54
    /// and 92). It must not serve that stale view as current, nor disturb the cluster it left.
    /// Only with `decommission`; it injects nothing on its own.
    Linger,
    /// A byte of a value in a partition replica's state store (its offset or time index, its
    /// scalar state, its producers, its snapshot, or the tree's format record) is flipped on
    /// the durable store, and the node's process restarts. The replica's open must refuse the
    /// state (a checksum names the tree and key; nothing corrupt is ever read back as state),
    /// the node must report the replica damaged and serve its others, and the operator's move
    /// must refill it from the healthy replicas, losing nothing, as for `disk-corrupt`.
    StateCorrupt,
}

impl FaultClass {
    pub const ALL: [FaultClass; 19] = [
        FaultClass::Partition,
        FaultClass::OneWay,
        FaultClass::IsolateLeader,
        FaultClass::Loss,
        FaultClass::Latency,
        FaultClass::Crash,
        FaultClass::SilentDeath,
        FaultClass::Bounce,
        FaultClass::Freeze,
        FaultClass::DiskFull,
        FaultClass::Move,
        FaultClass::Join,
        FaultClass::Decommission,
        FaultClass::FsyncFail,
        FaultClass::DiskCorrupt,
        FaultClass::MoveBack,
        FaultClass::ClockJump,
        FaultClass::Linger,
        FaultClass::StateCorrupt,
    ];

    /// Classes added after the first nine: a seed draws them from a stream of its own, so the
    /// first nine keep the profile they had for every seed (and `sim/REGRESSIONS.md` keeps
    /// meaning what it says).
    const LATER: [FaultClass; 10] = [
        FaultClass::DiskFull,
        FaultClass::Move,
        FaultClass::Join,
        FaultClass::Decommission,
        FaultClass::FsyncFail,
        FaultClass::DiskCorrupt,
        FaultClass::MoveBack,
        FaultClass::ClockJump,
        FaultClass::Linger,
        FaultClass::StateCorrupt,
    ];

    /// Classes whose injections draw from a random stream of their own in the nemesis, so that
    /// turning one on leaves the times and choices of every other class's faults as they were.
    pub const OWN_STREAM: [FaultClass; 5] = [
        FaultClass::DiskCorrupt,
        FaultClass::MoveBack,
        FaultClass::ClockJump,
        FaultClass::Linger,
        FaultClass::StateCorrupt,
    ];

    /// Classes that change how another class's faults end rather than inject faults of their
    /// own on a schedule.
    pub const MODIFIERS: [FaultClass; 1] = [FaultClass::Linger];

    pub fn name(&self) -> &'static str {
        match self {
            FaultClass::Partition => "partition",
            FaultClass::OneWay => "one-way",
            FaultClass::IsolateLeader => "isolate-leader",
            FaultClass::Loss => "loss",
            FaultClass::Latency => "latency",
            FaultClass::Crash => "crash",
            FaultClass::SilentDeath => "silent-death",
            FaultClass::Bounce => "bounce",
            FaultClass::Freeze => "freeze",
            FaultClass::DiskFull => "disk-full",
            FaultClass::Move => "move",
            FaultClass::Join => "join",
            FaultClass::Decommission => "decommission",
            FaultClass::FsyncFail => "fsync-fail",
            FaultClass::DiskCorrupt => "disk-corrupt",
            FaultClass::MoveBack => "move-back",
            FaultClass::ClockJump => "clock-jump",
            FaultClass::Linger => "linger",
            FaultClass::StateCorrupt => "state-corrupt",
        }
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one fault class behaves in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClassSettings {
    /// Mean simulated time between injections.
    pub mean_gap_ms: u64,
    /// How long a fault lasts, uniformly in this range.
    pub min_duration_ms: u64,
    pub max_duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub classes: BTreeMap<FaultClass, ClassSettings>,
    /// Whether a power loss may keep part of the last unsynced write (a torn write).
    pub torn_writes: bool,
}

impl Profile {
    /// Draws the profile of `seed`, from `allowed` classes (all when `None`). At least one
    /// class is always on.
    pub fn draw(seed: u64, allowed: Option<&[FaultClass]>) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0001);
        let mut later = SmallRng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0002);
        let allowed: Vec<FaultClass> = allowed.map_or_else(|| FaultClass::ALL.to_vec(), <[_]>::to_vec);
        let mut classes = BTreeMap::new();
        for c in &allowed {
            let rng = if FaultClass::LATER.contains(c) { &mut later } else { &mut rng };
            let on = rng.random_bool(0.5);
            let settings = ClassSettings {
                mean_gap_ms: rng.random_range(2_000..10_000),
                min_duration_ms: 500,
                max_duration_ms: rng.random_range(1_000..8_000),
            };
            if on {
                classes.insert(*c, settings);
            }
        }
        if classes.is_empty() && !allowed.is_empty() {
            let c = allowed[rng.random_range(0..allowed.len())];
            classes.insert(
                c,
                ClassSettings { mean_gap_ms: 4_000, min_duration_ms: 500, max_duration_ms: 4_000 },
            );
        }
        Self { classes, torn_writes: rng.random_bool(0.5) }
    }

    pub fn describe(&self) -> String {
        if self.classes.is_empty() {
            return "no faults".into();
        }
        let parts: Vec<String> = self
            .classes
            .iter()
            .map(|(c, s)| {
                format!(
                    "{c} every ~{:.1}s for {:.1}-{:.1}s",
                    s.mean_gap_ms as f64 / 1e3,
                    s.min_duration_ms as f64 / 1e3,
                    s.max_duration_ms as f64 / 1e3
                )
            })
            .collect();
        format!("{}{}", parts.join(", "), if self.torn_writes { "; torn writes" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_a_function_of_the_seed_and_vary() {
        assert_eq!(Profile::draw(7, None), Profile::draw(7, None));
        let distinct: std::collections::BTreeSet<Vec<FaultClass>> =
            (0..40).map(|s| Profile::draw(s, None).classes.keys().copied().collect()).collect();
        assert!(distinct.len() > 10, "40 seeds should give many different mixes: {distinct:?}");
        let only = Profile::draw(3, Some(&[FaultClass::Crash]));
        assert_eq!(only.classes.keys().copied().collect::<Vec<_>>(), vec![FaultClass::Crash]);
    }
}
