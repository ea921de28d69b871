//! Eddy's consensus layer: openraft's type configuration, the segment log store, the storage
//! seams ([`vfs::Vfs`], [`kv::StateStore`]) and their in-memory twins, the gRPC transport and the
//! registry that routes Raft messages to groups.
//!
//! This crate opens no sockets and reads no clock: listeners, connectors, files and state stores
//! are handed in by the caller, so the simulator can run it unchanged.

pub mod calls;
pub mod codec;
pub mod kv;
pub mod liveness;
pub mod log;
pub mod mem;
pub mod network;
pub mod registry;
pub mod service;
pub mod transport;
pub mod types;
pub mod vfs;

pub use types::*;
