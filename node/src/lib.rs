//! The Eddy broker node.
//!
//! A node hosts the metadata group (Raft group 0) and the partition groups placed on it, and
//! serves `eddy.v1.Broker`, `eddy.v1.Admin` and `eddy.v1.Groups` to clients and `eddy.v1.Raft` to peers. [`node::start`] wires it
//! together from a config and the injected seams of [`env::NodeEnv`].

pub mod api;
pub mod config;
pub mod control;
pub mod disk;
pub mod env;
pub mod error;
pub mod http;
pub mod limits;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod partition;
pub mod raft_config;
pub mod security;
pub mod service;
pub mod sm_common;
pub mod status;
