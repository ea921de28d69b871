//! The metadata group's state machine: applies [`MetaCommand`]s to [`MetaState`], persists the
//! result in the state store together with the last applied log id, and publishes every new
//! state on a watch channel for the partition manager and the client services.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use eddy_raft::C;
use eddy_raft::GroupId;
use eddy_raft::LogId;
use eddy_raft::Reply;
use eddy_raft::Snapshot;
use eddy_raft::SnapshotData;
use eddy_raft::SnapshotMeta;
use eddy_raft::StoredMembership;
use eddy_raft::kv::KvBatch;
use eddy_raft::kv::KvTree;
use eddy_raft::kv::StateStore;
use futures::Stream;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use super::command::MetaCommand;
use super::command::MetaError;
use super::command::MetaReply;
use super::state::MetaState;
use super::state::PartitionRecord;
use super::state::TopicRecord;
use crate::sm_common;

const STATE_KEY: &[u8] = b"state";

/// The stored metadata state and its snapshots start with this tag and a format version, so that
/// a build meeting state it cannot read says so instead of failing to decode it. Bump the
/// version whenever `MetaView` changes shape.
const FORMAT_TAG: &[u8; 3] = b"EDM";
const FORMAT_VERSION: u8 = 2;

fn encode_view(view: &MetaView) -> Vec<u8> {
    let mut out = FORMAT_TAG.to_vec();
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&sm_common::encode(view));
    out
}

fn decode_view(b: &[u8], what: &str) -> io::Result<MetaView> {
    match b.split_at_checked(FORMAT_TAG.len() + 1) {
        Some((head, body)) if head[..FORMAT_TAG.len()] == FORMAT_TAG[..] => {
            let version = head[FORMAT_TAG.len()];
            if version != FORMAT_VERSION {
                return Err(incompatible(what, &format!("format version {version}")));
            }
            sm_common::decode(body, what)
        }
        _ => Err(incompatible(what, "an unversioned format (before format version 2)")),
    }
}

fn incompatible(what: &str, found: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{what} is in {found}; this build of Eddy reads format version {FORMAT_VERSION}. \
             Run the Eddy version that wrote this data_dir, or start this node on an empty data_dir"
        ),
    )
}

/// A consistent view of the metadata: the state as of `last_applied`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaView {
    pub state: MetaState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Partition group → (topic, partition), built for every published view, so that loops over
    /// a node's groups look each one up in O(log n) rather than scanning every topic.
    #[serde(skip)]
    by_group: BTreeMap<GroupId, (String, u32)>,
}

impl MetaView {
    /// The topic and partition of a partition group.
    pub fn partition_of(&self, group: GroupId) -> Option<(&TopicRecord, u32, &PartitionRecord)> {
        let indexed = self.by_group.get(&group).and_then(|(t, i)| {
            let topic = self.state.topics.get(t)?;
            let p = topic.partitions.get(*i as usize).filter(|p| p.group_id == group)?;
            Some((topic, *i, p))
        });
        // A view that was not indexed (or changed since) is scanned.
        indexed.or_else(|| self.state.partition_of(group))
    }

    fn index(&mut self) {
        self.by_group = self
            .state
            .topics
            .iter()
            .flat_map(|(name, t)| {
                t.partitions.iter().enumerate().map(move |(i, p)| (p.group_id, (name.clone(), i as u32)))
            })
            .collect();
    }
}

pub struct MetaStateMachine {
    view: MetaView,
    tree: Arc<dyn KvTree>,
    store: Arc<dyn StateStore>,
    tx: watch::Sender<Arc<MetaView>>,
}

impl MetaStateMachine {
    /// Opens the state machine from the state store (tree `meta`).
    pub fn open(store: Arc<dyn StateStore>) -> io::Result<(Self, watch::Receiver<Arc<MetaView>>)> {
        let tree = store.tree("meta")?;
        let view = match tree.get(STATE_KEY)? {
            Some(b) => decode_view(&b, "the stored metadata state")?,
            None => MetaView::default(),
        };
        let mut published = view.clone();
        published.index();
        let (tx, rx) = watch::channel(Arc::new(published));
        Ok((Self { view, tree, store, tx }, rx))
    }

    fn persist(&self, batch: &mut KvBatch) {
        batch.put(STATE_KEY, encode_view(&self.view));
    }

    fn publish(&self) {
        let mut view = self.view.clone();
        view.index();
        self.tx.send_replace(Arc::new(view));
    }
}

impl RaftStateMachine<C> for MetaStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = MetaSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.view.last_applied, self.view.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut replies = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.view.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => MetaReply::Done,
                EntryPayload::Normal(p) => match MetaCommand::decode(&p.0) {
                    Ok(cmd) => self.view.state.apply(cmd),
                    // Every replica decodes the same bytes the same way, so replying with an
                    // error keeps them in agreement.
                    Err(e) => {
                        MetaReply::Error(MetaError::Invalid(format!("undecodable metadata command: {e}")))
                    }
                },
                EntryPayload::Membership(m) => {
                    self.view.state.apply_membership(&m);
                    self.view.membership = StoredMembership::new(Some(entry.log_id), m);
                    MetaReply::Done
                }
            };
            if let Some(r) = responder {
                replies.push((r, reply));
            }
        }
        let mut batch = KvBatch::default();
        self.persist(&mut batch);
        self.tree.apply(batch)?;
        self.publish();
        for (r, reply) in replies {
            r.send(Reply(reply.encode()));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MetaSnapshotBuilder { view: self.view.clone(), tree: self.tree.clone(), store: self.store.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let view = decode_view(&snapshot, "the metadata snapshot")?;
        self.view = MetaView {
            state: view.state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            by_group: BTreeMap::new(),
        };
        let mut batch = KvBatch::default();
        self.persist(&mut batch);
        sm_common::put_snapshot(&mut batch, meta, &snapshot);
        self.tree.apply(batch)?;
        self.store.flush().await?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        sm_common::load_snapshot(self.tree.as_ref())
    }
}

/// Builds a snapshot of the metadata as of the moment it was created.
pub struct MetaSnapshotBuilder {
    view: MetaView,
    tree: Arc<dyn KvTree>,
    store: Arc<dyn StateStore>,
}

impl RaftSnapshotBuilder<C> for MetaSnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let data = encode_view(&self.view);
        let meta = SnapshotMeta {
            last_log_id: self.view.last_applied,
            last_membership: self.view.membership.clone(),
        };
        let mut batch = KvBatch::default();
        sm_common::put_snapshot(&mut batch, &meta, &data);
        self.tree.apply(batch)?;
        // openraft purges the log up to the snapshot once this returns, so the snapshot and the
        // state it covers must be durable first.
        self.store.flush().await?;
        Ok(Snapshot { meta, snapshot: data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_state_round_trips_and_other_formats_are_refused_clearly() {
        let mut view = MetaView::default();
        view.state.next_member_id = 42;
        let bytes = encode_view(&view);
        assert_eq!(decode_view(&bytes, "state").expect("decodes"), view);

        let mut newer = bytes.clone();
        newer[FORMAT_TAG.len()] = FORMAT_VERSION + 1;
        let e = decode_view(&newer, "the stored metadata state").expect_err("a newer version");
        assert!(e.to_string().contains(&format!("format version {}", FORMAT_VERSION + 1)), "{e}");

        let unversioned = sm_common::encode(&view);
        let e = decode_view(&unversioned, "the stored metadata state").expect_err("unversioned");
        assert!(e.to_string().contains("unversioned"), "{e}");
        assert!(decode_view(&[], "x").is_err());
    }
}
