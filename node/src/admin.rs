//! `eddy.v1.Admin`: operations on the cluster's partitions.

use std::sync::Arc;
use std::time::Duration;

use eddy_proto::v1 as pb;
use eddy_proto::v1::admin_server::Admin;
use openraft::async_runtime::WatchReceiver;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::broker::BrokerState;
use crate::error::BrokerError;
use crate::limits;

/// How long a leadership transfer may take before the caller is told it did not complete.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AdminService {
    state: Arc<BrokerState>,
}

impl AdminService {
    pub fn new(state: Arc<BrokerState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn transfer_leadership(
        &self,
        request: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        let req = request.into_inner();
        limits::validate_topic_name("topic", &req.topic)?;
        let (topic, p) = self.state.partition(&req.topic, req.partition)?;
        let what = format!("{}/{}", topic.name, req.partition);
        if !p.replicas.contains(&req.to_node) {
            return Err(BrokerError::InvalidArgument(format!(
                "to_node: node {} holds no replica of {what} (replicas: {:?})",
                req.to_node, p.replicas
            ))
            .into());
        }
        let Some(h) = self.state.groups.get(p.group_id) else {
            return Err(BrokerError::NotLeader {
                what,
                me: self.state.me,
                leader: None,
                leader_addr: None,
            }
            .into());
        };
        let status = h.status();
        if status.leader == Some(req.to_node) {
            return Ok(Response::new(pb::TransferLeadershipResponse {
                leader: req.to_node,
            }));
        }
        if !status.is_leader {
            return Err(h.not_leader(status.leader).into());
        }
        h.raft()
            .trigger()
            .transfer_leader(req.to_node)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("{what}: {e}")))?;
        let mut metrics = h.raft().metrics();
        let wait = metrics.wait_until(|m| m.current_leader == Some(req.to_node));
        match tokio::time::timeout(TRANSFER_TIMEOUT, wait).await {
            Ok(Ok(_)) => Ok(Response::new(pb::TransferLeadershipResponse {
                leader: req.to_node,
            })),
            _ => Err(BrokerError::Timeout(format!(
                "{what}: node {} did not take over within {TRANSFER_TIMEOUT:?}; the leader is {:?}",
                req.to_node,
                h.raft().metrics().borrow_watched().current_leader
            ))
            .into()),
        }
    }
}
