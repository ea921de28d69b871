//! Partition groups: the replicated log of one partition of a topic.

pub mod command;
pub mod handle;
pub mod producers;
pub mod retention;
pub mod sm;
pub mod state;

pub use handle::PartitionHandle;
pub use sm::PartitionStateMachine;
