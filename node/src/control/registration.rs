//! Each node registers what other nodes tell clients about it and what only its own
//! configuration knows: its Kafka listener's address and its rack. The registration is a
//! metadata record ([`MetaCommand::RegisterNode`]), as Kafka's broker registrations and
//! Redpanda's members table are, so every node answers a Kafka `Metadata` request with every
//! broker's address and rack from its own view. The loop proposes only when the record differs
//! from the configuration (at first start, and after a restart with a changed configuration);
//! otherwise it reads the view once per interval and does nothing.

use std::time::Duration;

use eddy_raft::NodeId;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use crate::meta::MetaCommand;
use crate::meta::MetaHandle;

const INTERVAL: Duration = Duration::from_secs(1);
/// Until registered: a node's Kafka clients see no broker for it before then.
const INTERVAL_UNREGISTERED: Duration = Duration::from_millis(100);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Registration {
    pub me: NodeId,
    pub meta: MetaHandle,
    pub kafka_addr: Option<String>,
    pub rack: Option<String>,
}

impl Registration {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let view = self.meta.view();
            // A node not yet in the node table (joining) waits until it is.
            let record = view.state.nodes.get(&self.me);
            let stale = record.is_some_and(|n| n.kafka_addr != self.kafka_addr || n.rack != self.rack);
            if stale {
                let cmd = MetaCommand::RegisterNode {
                    node: self.me,
                    kafka_addr: self.kafka_addr.clone(),
                    rack: self.rack.clone(),
                };
                match self.meta.write(cmd, WRITE_TIMEOUT).await {
                    Ok(_) => info!(kafka_addr = ?self.kafka_addr, rack = ?self.rack, "registered"),
                    Err(e) => warn!("registering the Kafka address and rack failed (will retry): {e}"),
                }
            }
            let pause = if stale || record.is_none() { INTERVAL_UNREGISTERED } else { INTERVAL };
            tokio::select! {
                // Both arms only wait.
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
