//! The protocols clients speak to a node. Each adapter converts its wire types at the boundary,
//! validates them (naming the field in the error) and calls the node's services.

pub mod grpc;
pub mod kafka;
