//! The metadata (controller) group, Raft group 0: nodes, topics, partition placement and
//! producer ids, consumer groups and their committed offsets.

pub mod command;
pub mod groups;
pub mod handle;
pub mod sm;
pub mod state;

pub use command::MetaCommand;
pub use command::MetaError;
pub use command::MetaReply;
pub use handle::MetaHandle;
pub use sm::ApplyObserver;
pub use sm::MetaStateMachine;
pub use sm::MetaView;
pub use state::MetaState;
