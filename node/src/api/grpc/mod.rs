//! gRPC: `eddy.v1.Broker` (data and topics), `eddy.v1.Admin` (operating the cluster) and
//! `eddy.v1.Groups` (consumer groups).

pub mod admin;
pub mod broker;
pub mod groups;
