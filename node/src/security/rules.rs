//! The authorization decision for every gRPC method a node serves, in one table: a method
//! without a row is refused (fail closed), and a test checks that every method of every service
//! has one. [`layer::AuthLayer`](super::layer::AuthLayer) applies the rows that need no request
//! body; for `PerResource` and `Filtered` rows the handler checks the resources the request names
//! (its row says which), with [`Caller::check`](super::Caller::check).
//!
//! The operations follow Kafka's, so an operator's bindings mean the same on both listeners:
//! producing is `write` on the topic, consuming `read` on the topic and on the group, topic
//! admin `create`/`delete`/`alter`, cluster admin `alter` (`describe` to look).

use super::acl::Operation;
use super::acl::Operation::*;
use super::acl::ResourceType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, authenticated or not (health, reflection, who-am-I).
    Public,
    /// Another node of this cluster, by its node certificate: the Raft service.
    Node,
    /// Any node certificate the cluster CA signed: a node asking to join, whose handler checks
    /// that it asks for the id its certificate names.
    JoiningNode,
    /// A node of this cluster, or a user allowed this operation on the cluster (the requests
    /// nodes fan out to each other's client ports).
    NodeOrCluster(Operation),
    /// A user allowed this operation on the cluster.
    Cluster(Operation),
    /// Any authenticated user; the handler checks what the request names, as described.
    PerResource(&'static str),
    /// Any authenticated user; the answer lists only the resources of this type the user may
    /// describe.
    Filtered(ResourceType),
}

/// Every gRPC method a node serves, with its rule.
pub const GRPC: &[(&str, Rule)] = &[
    // eddy.v1.Broker
    ("/eddy.v1.Broker/CreateTopic", Rule::PerResource("create on the topic, or on the cluster")),
    ("/eddy.v1.Broker/ListTopics", Rule::Filtered(ResourceType::Topic)),
    ("/eddy.v1.Broker/DescribeTopic", Rule::PerResource("describe on the topic")),
    ("/eddy.v1.Broker/Metadata", Rule::PerResource("describe on each topic named; all topics are filtered")),
    ("/eddy.v1.Broker/InitProducer", Rule::PerResource("none: a producer id grants nothing by itself")),
    ("/eddy.v1.Broker/Produce", Rule::PerResource("write on the topic")),
    ("/eddy.v1.Broker/Fetch", Rule::PerResource("read on the topic")),
    ("/eddy.v1.Broker/NodeStatus", Rule::NodeOrCluster(Describe)),
    ("/eddy.v1.Broker/ListOffsets", Rule::PerResource("describe on the topic")),
    // eddy.v1.Admin
    ("/eddy.v1.Admin/TransferLeadership", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ListNodes", Rule::Cluster(Describe)),
    ("/eddy.v1.Admin/SetNodeState", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ClusterHealth", Rule::Cluster(Describe)),
    ("/eddy.v1.Admin/BalanceLeaders", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/DeleteTopic", Rule::PerResource("delete on the topic")),
    ("/eddy.v1.Admin/AlterTopicConfig", Rule::PerResource("alter on the topic")),
    ("/eddy.v1.Admin/AddPartitions", Rule::PerResource("alter on the topic")),
    ("/eddy.v1.Admin/MovePartition", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ListMoves", Rule::Cluster(Describe)),
    ("/eddy.v1.Admin/CancelMove", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/Join", Rule::JoiningNode),
    ("/eddy.v1.Admin/BalanceLocal", Rule::NodeOrCluster(Alter)),
    ("/eddy.v1.Admin/CreateUser", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/DeleteUser", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ListUsers", Rule::Cluster(Describe)),
    ("/eddy.v1.Admin/AddAcl", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/RemoveAcl", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ListAcls", Rule::Cluster(Describe)),
    ("/eddy.v1.Admin/WhoAmI", Rule::Public),
    ("/eddy.v1.Admin/SetQuota", Rule::Cluster(Alter)),
    ("/eddy.v1.Admin/ListQuotas", Rule::Cluster(Describe)),
    // eddy.v1.Groups
    ("/eddy.v1.Groups/JoinGroup", Rule::PerResource("read on the group, describe on each topic")),
    ("/eddy.v1.Groups/Heartbeat", Rule::PerResource("read on the group")),
    ("/eddy.v1.Groups/LeaveGroup", Rule::PerResource("read on the group")),
    ("/eddy.v1.Groups/CommitOffsets", Rule::PerResource("read on the group and on each topic")),
    ("/eddy.v1.Groups/FetchOffsets", Rule::PerResource("describe on the group; topics filtered by describe")),
    ("/eddy.v1.Groups/ListGroups", Rule::Filtered(ResourceType::Group)),
    ("/eddy.v1.Groups/DescribeGroup", Rule::PerResource("describe on the group")),
    ("/eddy.v1.Groups/ResetOffsets", Rule::PerResource("read on the group and on each topic")),
    ("/eddy.v1.Groups/DeleteGroup", Rule::PerResource("delete on the group")),
    // eddy.v1.Raft: node to node only.
    ("/eddy.v1.Raft/Vote", Rule::Node),
    ("/eddy.v1.Raft/PreVote", Rule::Node),
    ("/eddy.v1.Raft/AppendEntries", Rule::Node),
    ("/eddy.v1.Raft/StreamAppend", Rule::Node),
    ("/eddy.v1.Raft/InstallSnapshot", Rule::Node),
    ("/eddy.v1.Raft/TransferLeader", Rule::Node),
    ("/eddy.v1.Raft/ForwardMeta", Rule::Node),
    ("/eddy.v1.Raft/Heartbeat", Rule::Node),
    ("/eddy.v1.Raft/Calls", Rule::Node),
    ("/eddy.v1.Raft/Members", Rule::Node),
    // Health and reflection say nothing about the data.
    ("/grpc.health.v1.Health/Check", Rule::Public),
    ("/grpc.health.v1.Health/Watch", Rule::Public),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Rule::Public),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Rule::Public),
];

/// The rule of a gRPC method path (`/package.Service/Method`); `None` is refused.
pub fn grpc(path: &str) -> Option<Rule> {
    GRPC.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of every service in Eddy's descriptors, and of health and reflection, has a
    /// row, and every row names a method that exists.
    #[test]
    fn every_grpc_method_has_exactly_one_rule() {
        use prost::Message;
        let mut methods = Vec::new();
        for set in [eddy_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let fds = prost_types::FileDescriptorSet::decode(set).expect("descriptor set");
            for file in fds.file {
                for service in &file.service {
                    for m in &service.method {
                        methods.push(format!("/{}.{}/{}", file.package(), service.name(), m.name()));
                    }
                }
            }
        }
        methods.push("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        methods.push("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
        for m in &methods {
            assert_eq!(GRPC.iter().filter(|(p, _)| p == m).count(), 1, "{m} must have exactly one rule");
        }
        for (p, _) in GRPC {
            assert!(methods.iter().any(|m| m == p), "the rule for {p} names no method");
        }
        assert_eq!(grpc("/eddy.v1.Broker/Nope"), None);
        assert_eq!(grpc("/eddy.v1.Raft/Calls"), Some(Rule::Node));
    }
}
