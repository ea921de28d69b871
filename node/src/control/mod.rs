//! The loops that run in the background on every node, apart from any request: the partition
//! manager (starts and stops the Raft replicas this node hosts), the reconciler (moves membership
//! and leadership of the partitions it leads toward what the metadata wants), the controller
//! (the metadata leader's node duties), the consumer-group coordinator (member liveness) and the
//! registration (this node's Kafka address and rack in the metadata).

pub mod controller;
pub mod coordinator;
pub mod manager;
pub mod reconciler;
pub mod registration;
