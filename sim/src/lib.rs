//! `eddy-sim`: runs the real Eddy node code on turmoil's simulated network with simulated disks,
//! injects faults chosen by a seed, and checks that nothing acknowledged was lost. The same seed
//! replays the same run exactly.

pub mod checker;
pub mod clock;
pub mod cluster;
pub mod history;
pub mod jepsen;
pub mod nemesis;
pub mod net;
pub mod observer;
pub mod profile;
pub mod report;
pub mod run;
pub mod trace;
pub mod workload;
