//! A Raft group's log: append-only segment files of CRC32C-framed entries, with group commit.
//! The partition log *is* this Raft log; there is no second copy of the records.

pub mod frame;
pub mod segments;
pub mod state_file;
pub mod store;

pub use segments::RecoveryReport;
pub use segments::SegmentInfo;
pub use store::FailureObserver;
pub use store::LogConfig;
pub use store::LogReader;
pub use store::LogStore;
