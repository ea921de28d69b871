//! The metadata group's state machine: applies [`MetaCommand`]s to [`MetaState`], persists the
//! result in the state store together with the last applied log id, and publishes every new
//! state on a watch channel for the partition manager and the client services.
//!
//! Cost per command, which matters once consumer groups commit offsets over thousands of
//! partitions (every commit is a metadata command): applying copies only the records the command
//! changes (topics and groups are shared `Arc`s, see [`MetaState`]); publishing clones maps of
//! `Arc`s and reuses the partition index unless a topic changed; and a batch made only of offset
//! commits is persisted at most every [`PERSIST_INTERVAL`] instead of at once. That is safe for
//! the same reason persisting without a flush is: the state store holds a prefix of the applied
//! log, and a restarted node replays the log after it. Whichever of the stored state and the
//! stored snapshot is newer is the starting point (the log before the snapshot may be purged).

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
use super::state::Topics;
use crate::sm_common;

const STATE_KEY: &[u8] = b"state";

/// How long the stored state may lag the applied state through batches of offset commits.
pub const PERSIST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The stored metadata state and its snapshots start with this tag and a format version, so that
/// a build meeting state it cannot read says so instead of failing to decode it. Bump the
/// version whenever `MetaView` changes shape, and keep reading the previous ones (see [`v3`]).
const FORMAT_TAG: &[u8; 3] = b"EDM";
const FORMAT_VERSION: u8 = 5;

fn encode_view(view: &MetaView) -> Vec<u8> {
    let mut out = FORMAT_TAG.to_vec();
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&sm_common::encode(view));
    out
}

fn decode_view(b: &[u8], what: &str) -> io::Result<MetaView> {
    match b.split_at_checked(FORMAT_TAG.len() + 1) {
        Some((head, body)) if head[..FORMAT_TAG.len()] == FORMAT_TAG[..] => match head[FORMAT_TAG.len()] {
            FORMAT_VERSION => sm_common::decode(body, what),
            4 => sm_common::decode::<v4::MetaView>(body, what).map(Into::into),
            3 => sm_common::decode::<v3::MetaView>(body, what).map(Into::into),
            2 => sm_common::decode::<v2::MetaView>(body, what).map(Into::into),
            version => Err(incompatible(what, &format!("format version {version}"))),
        },
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

/// Format version 4 (before users and ACL bindings), read and converted.
mod v4 {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use eddy_raft::GroupId;
    use eddy_raft::LogId;
    use eddy_raft::NodeId;
    use eddy_raft::StoredMembership;
    use serde::Deserialize;

    use crate::meta::groups;
    use crate::meta::state;

    #[derive(Deserialize)]
    pub struct MetaView {
        state: MetaState,
        last_applied: Option<LogId>,
        membership: StoredMembership,
    }

    #[derive(Deserialize)]
    struct MetaState {
        nodes: BTreeMap<NodeId, state::NodeRecord>,
        topics: state::Topics,
        next_group_id: GroupId,
        next_producer_id: u64,
        groups: BTreeMap<String, Arc<groups::GroupRecord>>,
        next_member_id: u64,
    }

    impl From<MetaView> for super::MetaView {
        fn from(v: MetaView) -> Self {
            let s = v.state;
            super::MetaView {
                state: state::MetaState {
                    nodes: s.nodes,
                    topics: s.topics,
                    next_group_id: s.next_group_id,
                    next_producer_id: s.next_producer_id,
                    groups: s.groups,
                    next_member_id: s.next_member_id,
                    ..Default::default()
                },
                last_applied: v.last_applied,
                membership: v.membership,
                by_group: Default::default(),
            }
        }
    }
}

/// Format version 3 (before consumer groups kept Kafka clients' offset metadata strings), read
/// and converted.
mod v3 {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use eddy_raft::GroupId;
    use eddy_raft::LogId;
    use eddy_raft::NodeId;
    use eddy_raft::StoredMembership;
    use serde::Deserialize;

    use crate::meta::groups;
    use crate::meta::state;

    #[derive(Deserialize)]
    pub struct MetaView {
        state: MetaState,
        last_applied: Option<LogId>,
        membership: StoredMembership,
    }

    #[derive(Deserialize)]
    struct MetaState {
        nodes: BTreeMap<NodeId, state::NodeRecord>,
        topics: state::Topics,
        next_group_id: GroupId,
        next_producer_id: u64,
        groups: BTreeMap<String, GroupRecord>,
        next_member_id: u64,
    }

    /// A consumer group as versions 2 and 3 stored it.
    #[derive(Deserialize)]
    pub struct GroupRecord {
        assignor: groups::Assignor,
        generation: u64,
        members: BTreeMap<String, Arc<groups::MemberRecord>>,
        offsets: BTreeMap<groups::TopicPartition, u64>,
    }

    /// Version 3's groups in today's shape.
    pub fn groups(old: BTreeMap<String, GroupRecord>) -> BTreeMap<String, Arc<groups::GroupRecord>> {
        old.into_iter()
            .map(|(name, g)| {
                let mut new = groups::GroupRecord::new(g.assignor);
                new.generation = g.generation;
                new.members = g.members;
                new.offsets = g.offsets;
                (name, Arc::new(new))
            })
            .collect()
    }

    impl From<MetaView> for super::MetaView {
        fn from(v: MetaView) -> Self {
            let s = v.state;
            super::MetaView {
                state: state::MetaState {
                    nodes: s.nodes,
                    topics: s.topics,
                    next_group_id: s.next_group_id,
                    next_producer_id: s.next_producer_id,
                    groups: groups(s.groups),
                    next_member_id: s.next_member_id,
                    ..Default::default()
                },
                last_applied: v.last_applied,
                membership: v.membership,
                by_group: Default::default(),
            }
        }
    }
}

/// Format version 2 (before nodes registered their Kafka address and rack), read and converted.
mod v2 {
    use eddy_raft::GroupId;
    use eddy_raft::LogId;
    use eddy_raft::NodeAddr;
    use eddy_raft::NodeId;
    use eddy_raft::StoredMembership;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    use super::v3::GroupRecord;
    use crate::meta::state;

    #[derive(Deserialize)]
    pub struct MetaView {
        state: MetaState,
        last_applied: Option<LogId>,
        membership: StoredMembership,
    }

    #[derive(Deserialize)]
    struct MetaState {
        nodes: BTreeMap<NodeId, NodeRecord>,
        topics: state::Topics,
        next_group_id: GroupId,
        next_producer_id: u64,
        groups: BTreeMap<String, GroupRecord>,
        next_member_id: u64,
    }

    #[derive(Deserialize)]
    struct NodeRecord {
        addr: NodeAddr,
        state: state::NodeState,
    }

    impl From<MetaView> for super::MetaView {
        fn from(v: MetaView) -> Self {
            let s = v.state;
            let nodes = s
                .nodes
                .into_iter()
                .map(|(id, n)| {
                    (id, state::NodeRecord { addr: n.addr, state: n.state, kafka_addr: None, rack: None })
                })
                .collect();
            super::MetaView {
                state: state::MetaState {
                    nodes,
                    topics: s.topics,
                    next_group_id: s.next_group_id,
                    next_producer_id: s.next_producer_id,
                    groups: super::v3::groups(s.groups),
                    next_member_id: s.next_member_id,
                    ..Default::default()
                },
                last_applied: v.last_applied,
                membership: v.membership,
                by_group: Default::default(),
            }
        }
    }
}

/// A consistent view of the metadata: the state as of `last_applied`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaView {
    pub state: MetaState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Partition group → (topic, partition), so that loops over a node's groups look each one
    /// up in O(log n) rather than scanning every topic. Rebuilt only when a topic changed.
    #[serde(skip)]
    by_group: Arc<BTreeMap<GroupId, (String, u32)>>,
}

impl MetaView {
    /// The topic and partition of a partition group.
    pub fn partition_of(&self, group: GroupId) -> Option<(&TopicRecord, u32, &PartitionRecord)> {
        let indexed = self.by_group.get(&group).and_then(|(t, i)| {
            let topic = self.state.topics.get(t)?;
            let p = topic.partitions.get(*i as usize).filter(|p| p.group_id == group)?;
            Some((&**topic, *i, p))
        });
        // A view that was not indexed (or changed since) is scanned.
        indexed.or_else(|| self.state.partition_of(group))
    }

    fn index(&mut self) {
        self.by_group = Arc::new(
            self.state
                .topics
                .iter()
                .flat_map(|(name, t)| {
                    t.partitions.iter().enumerate().map(move |(i, p)| (p.group_id, (name.clone(), i as u32)))
                })
                .collect(),
        );
    }

    /// Whether `other` has the same nodes and the very same topic records: nothing that places
    /// replicas differs, so loops that follow placement can skip it. O(nodes + topics).
    pub fn same_placement(&self, other: &MetaView) -> bool {
        self.state.nodes == other.state.nodes && same_topics(&self.state.topics, &other.state.topics)
    }
}

fn same_topics(a: &Topics, b: &Topics) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((na, ta), (nb, tb))| na == nb && Arc::ptr_eq(ta, tb))
}

/// Told how long each applied batch took (for the apply latency metric).
pub type ApplyObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

pub struct MetaStateMachine {
    view: MetaView,
    /// The view last published; its index is reused while the topics stay the same.
    published: Arc<MetaView>,
    /// When the state was last written to the state store.
    persisted_at: tokio::time::Instant,
    on_apply: Option<ApplyObserver>,
    tree: Arc<dyn KvTree>,
    store: Arc<dyn StateStore>,
    tx: watch::Sender<Arc<MetaView>>,
    /// The metadata log: an entry is applied only once it is on this node's disk (see
    /// `LogReader::wait_durable`), so the stored state is never ahead of the log.
    log: Option<eddy_raft::log::LogReader>,
}

impl MetaStateMachine {
    pub fn set_log(&mut self, log: eddy_raft::log::LogReader) {
        self.log = Some(log);
    }

    /// Opens the state machine from the state store (tree `meta`).
    pub fn open(store: Arc<dyn StateStore>) -> io::Result<(Self, watch::Receiver<Arc<MetaView>>)> {
        let tree = store.tree("meta")?;
        let mut view = match tree.get(STATE_KEY)? {
            Some(b) => decode_view(&b, "the stored metadata state")?,
            None => MetaView::default(),
        };
        // Offset commits may have left the stored state behind the stored snapshot.
        if let Some(snap) = sm_common::load_snapshot(tree.as_ref())?
            && snap.meta.last_log_id > view.last_applied
        {
            view = MetaView {
                state: decode_view(&snap.snapshot, "the stored metadata snapshot")?.state,
                last_applied: snap.meta.last_log_id,
                membership: snap.meta.last_membership.clone(),
                by_group: Default::default(),
            };
        }
        let mut published = view.clone();
        published.index();
        let published = Arc::new(published);
        let (tx, rx) = watch::channel(published.clone());
        let sm = Self {
            view,
            published,
            persisted_at: tokio::time::Instant::now(),
            on_apply: None,
            tree,
            store,
            tx,
            log: None,
        };
        Ok((sm, rx))
    }

    /// Calls `f` with the duration of every applied batch.
    pub fn set_apply_observer(&mut self, f: ApplyObserver) {
        self.on_apply = Some(f);
    }

    fn persist(&mut self, batch: &mut KvBatch) {
        batch.put(STATE_KEY, encode_view(&self.view));
        self.persisted_at = tokio::time::Instant::now();
    }

    fn publish(&mut self) {
        let mut view = self.view.clone();
        if same_topics(&view.state.topics, &self.published.state.topics) {
            view.by_group = self.published.by_group.clone();
        } else {
            view.index();
        }
        self.published = Arc::new(view);
        self.tx.send_replace(self.published.clone());
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
        let mut started = None;
        // Whether the batch holds anything but offset commits, which must be stored at once.
        let mut structural = false;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            if let Some(log) = &self.log {
                log.wait_durable(entry.log_id.index).await;
            }
            started.get_or_insert_with(tokio::time::Instant::now);
            self.view.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => MetaReply::Done,
                EntryPayload::Normal(p) => match MetaCommand::decode(&p.0) {
                    Ok(cmd) => {
                        structural |= !matches!(
                            cmd,
                            MetaCommand::CommitOffsets { .. } | MetaCommand::CommitOffsetsWithMetadata { .. }
                        );
                        self.view.state.apply(cmd)
                    }
                    // Every replica decodes the same bytes the same way, so replying with an
                    // error keeps them in agreement.
                    Err(e) => {
                        MetaReply::Error(MetaError::Invalid(format!("undecodable metadata command: {e}")))
                    }
                },
                EntryPayload::Membership(m) => {
                    structural = true;
                    self.view.state.apply_membership(&m);
                    self.view.membership = StoredMembership::new(Some(entry.log_id), m);
                    MetaReply::Done
                }
            };
            if let Some(r) = responder {
                replies.push((r, reply));
            }
        }
        if structural || self.persisted_at.elapsed() >= PERSIST_INTERVAL {
            let mut batch = KvBatch::default();
            self.persist(&mut batch);
            self.tree.apply(batch)?;
        }
        self.publish();
        for (r, reply) in replies {
            r.send(Reply(reply.encode()));
        }
        if let (Some(observe), Some(started)) = (&self.on_apply, started) {
            observe(started.elapsed());
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
            by_group: Default::default(),
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
    use eddy_raft::mem::MemStateStore;

    use super::*;

    fn log_id(index: u64) -> LogId {
        eddy_raft::types::log_id(1, index)
    }

    #[test]
    fn open_starts_from_the_newer_of_the_stored_state_and_snapshot() {
        let store = Arc::new(MemStateStore::default());
        let tree = store.tree("meta").expect("tree");
        let stored = |next_member_id, last| {
            let mut view = MetaView::default();
            view.state.next_member_id = next_member_id;
            view.last_applied = Some(log_id(last));
            view
        };
        // Offset commits left the state (at 5) behind the snapshot (at 9).
        let mut batch = KvBatch::default();
        batch.put(STATE_KEY, encode_view(&stored(5, 5)));
        let meta =
            SnapshotMeta { last_log_id: Some(log_id(9)), last_membership: StoredMembership::default() };
        sm_common::put_snapshot(&mut batch, &meta, &encode_view(&stored(9, 9)));
        tree.apply(batch).expect("apply");
        let (sm, view) = MetaStateMachine::open(store.clone()).expect("open");
        assert_eq!(sm.view.last_applied, Some(log_id(9)));
        assert_eq!(view.borrow().state.next_member_id, 9);

        // A newer state wins over an older snapshot.
        let mut batch = KvBatch::default();
        batch.put(STATE_KEY, encode_view(&stored(12, 12)));
        tree.apply(batch).expect("apply");
        let (sm, _) = MetaStateMachine::open(store).expect("open");
        assert_eq!(sm.view.last_applied, Some(log_id(12)));
        assert_eq!(sm.view.state.next_member_id, 12);
    }

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

        // Format version 2 had no node registrations; it is read with none.
        #[derive(Serialize)]
        struct NodeV2<'a> {
            addr: &'a eddy_raft::NodeAddr,
            state: crate::meta::state::NodeState,
        }
        view.state.nodes.insert(
            1,
            crate::meta::state::NodeRecord {
                addr: eddy_raft::NodeAddr { raft_addr: "r:1".into(), client_addr: "c:1".into() },
                state: crate::meta::state::NodeState::Active,
                kafka_addr: None,
                rack: None,
            },
        );
        let s = &view.state;
        let nodes: BTreeMap<_, _> =
            s.nodes.iter().map(|(id, n)| (*id, NodeV2 { addr: &n.addr, state: n.state })).collect();
        let mut v2 = vec![b'E', b'D', b'M', 2];
        v2.extend(sm_common::encode(&(
            (&nodes, &s.topics, s.next_group_id, s.next_producer_id, &s.groups, s.next_member_id),
            &view.last_applied,
            &view.membership,
        )));
        assert_eq!(decode_view(&v2, "state").expect("version 2 decodes"), view);

        // Format version 3 had no offset metadata in consumer groups; it is read with none.
        let mut with_group = view.clone();
        let mut g = crate::meta::groups::GroupRecord::new(crate::meta::groups::Assignor::Range);
        g.generation = 4;
        g.offsets.insert(("t".into(), 0), 9);
        with_group.state.groups.insert("g".into(), Arc::new(g.clone()));
        let s = &with_group.state;
        let groups_v3: BTreeMap<_, _> = s
            .groups
            .iter()
            .map(|(name, g)| (name, (g.assignor, g.generation, &g.members, &g.offsets)))
            .collect();
        let mut v3 = vec![b'E', b'D', b'M', 3];
        v3.extend(sm_common::encode(&(
            (&s.nodes, &s.topics, s.next_group_id, s.next_producer_id, &groups_v3, s.next_member_id),
            &with_group.last_applied,
            &with_group.membership,
        )));
        assert_eq!(decode_view(&v3, "state").expect("version 3 decodes"), with_group);
        g.offset_metadata.insert(("t".into(), 0), "checkpoint".into());
        with_group.state.groups.insert("g".into(), Arc::new(g));
        assert_eq!(decode_view(&encode_view(&with_group), "state").expect("decodes"), with_group);

        // Format version 4 had no users or ACL bindings; it is read with none.
        let s = &with_group.state;
        let mut v4 = vec![b'E', b'D', b'M', 4];
        v4.extend(sm_common::encode(&(
            (&s.nodes, &s.topics, s.next_group_id, s.next_producer_id, &s.groups, s.next_member_id),
            &with_group.last_applied,
            &with_group.membership,
        )));
        assert_eq!(decode_view(&v4, "state").expect("version 4 decodes"), with_group);
        let mut secured = with_group.clone();
        let creds = eddy_proto::credentials::credentials("alice.secret", &[[1; 16], [2; 16], [3; 16]]);
        let record = crate::security::users::UserRecord::from_proto(&creds).expect("valid");
        secured.state.apply(MetaCommand::PutUser { name: "alice".into(), record, replace: false });
        let binding = crate::security::acl::AclBinding::from_proto(&eddy_proto::v1::AclBinding {
            principal: "User:alice".into(),
            resource_type: "topic".into(),
            resource: "orders.".into(),
            pattern: "prefixed".into(),
            operation: "write".into(),
            permission: "allow".into(),
        })
        .expect("valid");
        assert_eq!(secured.state.apply(MetaCommand::AddAcl(binding.clone())), MetaReply::Changed(true));
        assert_eq!(secured.state.apply(MetaCommand::AddAcl(binding)), MetaReply::Changed(false));
        assert_eq!(decode_view(&encode_view(&secured), "state").expect("decodes"), secured);
        assert_ne!(secured, with_group);

        let mut registered = view.clone();
        registered.state.apply(MetaCommand::RegisterNode {
            node: 1,
            kafka_addr: Some("k:1".into()),
            rack: Some("a".into()),
        });
        assert_eq!(decode_view(&encode_view(&registered), "state").expect("decodes"), registered);
        assert_ne!(registered, view);

        let unversioned = sm_common::encode(&view);
        let e = decode_view(&unversioned, "the stored metadata state").expect_err("unversioned");
        assert!(e.to_string().contains("unversioned"), "{e}");
        assert!(decode_view(&[], "x").is_err());
    }
}
