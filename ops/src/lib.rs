//! The Eddy client library and the building blocks of `eddyctl`.
//!
//! [`Client`] talks to any node of a cluster, caches its metadata, routes produce requests to
//! partition leaders and reads from the replica of your choice. [`Producer`] adds batching and
//! idempotence on top. [`GroupConsumer`] is a member of a
//! consumer group.

pub mod client;
pub mod error;
pub mod group;
pub mod offsets;
pub mod output;
pub mod pki;
pub mod producer;

pub use client::Client;
pub use client::ClientConfig;
pub use client::Connect;
pub use client::ReplicaChoice;
pub use client::TcpConnect;
pub use client::TlsOptions;
pub use client::Token;
pub use error::ClientError;
pub use group::GroupConfig;
pub use group::GroupConsumer;
pub use offsets::OffsetSpec;
pub use producer::Ack;
pub use producer::MAX_IN_FLIGHT_LIMIT;
pub use producer::Producer;
pub use producer::ProducerConfig;
