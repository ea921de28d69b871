//! The consumer-group coordinator's liveness duty, on the metadata leader: it remembers when
//! each member last heartbeated (in memory, not replicated) and proposes
//! [`MetaCommand::ExpireMember`] for a member silent for longer than its session timeout.
//!
//! A node that becomes the metadata leader has no heartbeat history, so it grants every member a
//! fresh session timeout from that moment, as Kafka's coordinator does after a failover.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use eddy_raft::NodeId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use crate::meta::MetaCommand;
use crate::meta::MetaHandle;
use crate::meta::MetaState;

const TICK: Duration = Duration::from_millis(200);
const EXPIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// When each (group, member) was last heard from on this node.
#[derive(Default)]
pub struct Liveness {
    seen: Mutex<BTreeMap<(String, String), Instant>>,
}

impl Liveness {
    pub fn touch(&self, group: &str, member: &str) {
        let mut seen = self.seen.lock().expect("liveness lock poisoned");
        seen.insert((group.to_owned(), member.to_owned()), Instant::now());
    }

    fn clear(&self) {
        self.seen.lock().expect("liveness lock poisoned").clear();
    }

    /// The members of `state` not heard from within their session timeout. A member seen for
    /// the first time starts its timeout now; members that left are forgotten.
    fn expired(&self, state: &MetaState, now: Instant) -> Vec<(String, String)> {
        let mut seen = self.seen.lock().expect("liveness lock poisoned");
        seen.retain(|(g, m), _| state.groups.get(g).is_some_and(|g| g.members.contains_key(m)));
        let mut out = Vec::new();
        for (g, group) in &state.groups {
            for (m, member) in &group.members {
                let last = *seen.entry((g.clone(), m.clone())).or_insert(now);
                if now.saturating_duration_since(last)
                    > Duration::from_millis(member.session_timeout_ms.into())
                {
                    out.push((g.clone(), m.clone()));
                }
            }
        }
        out
    }
}

pub struct Coordinator {
    pub me: NodeId,
    pub meta: MetaHandle,
}

impl Coordinator {
    pub async fn run(self, cancel: CancellationToken) {
        let liveness = self.meta.liveness().clone();
        let mut leading = false;
        loop {
            tokio::select! {
                // Both arms only wait.
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            let leader = self.meta.leader() == Some(self.me);
            if leader && !leading {
                liveness.clear();
            }
            leading = leader;
            if !leader {
                continue;
            }
            let view = self.meta.view();
            for (group, member) in liveness.expired(&view.state, Instant::now()) {
                info!(group, member, "consumer session expired; removing the member");
                let cmd = MetaCommand::ExpireMember { group: group.clone(), member: member.clone() };
                if let Err(e) = self.meta.write(cmd, EXPIRE_TIMEOUT).await {
                    warn!(group, member, "expiring the member failed: {e}");
                }
            }
        }
    }
}
