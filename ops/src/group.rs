//! [`GroupConsumer`]: a member of a consumer group. It joins through `eddy.v1.Groups`, keeps its
//! session alive from [`GroupConsumer::poll`], consumes the partitions the coordinator assigns
//! to it, and commits the positions it has delivered.
//!
//! Delivery is at-least-once: [`GroupConsumer::poll`] hands out records, and a later commit
//! records that they were processed. A partition taken away is committed before it is reported
//! given up, so its next owner resumes where this member stopped; records delivered but not
//! committed when a member dies are delivered again to the next owner.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use eddy_proto::error_codes;
use eddy_proto::v1 as pb;
use eddy_proto::v1::groups_client::GroupsClient;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;
use tracing::info;
use tracing::warn;

use crate::client::Client;
use crate::client::ReplicaChoice;
use crate::error::Result;
use crate::offsets::OffsetSpec;

pub type TopicPartition = (String, u32);

/// Start-position lookups a member runs at once when it takes partitions.
const START_LOOKUPS_MAX: usize = 32;

/// Committed (partition, next offset) pairs.
pub type Offsets = Vec<(TopicPartition, u64)>;

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: String,
    pub topics: Vec<String>,
    pub session_timeout: Duration,
    /// `cooperative-sticky` (default), `range` or `round-robin`.
    pub assignor: String,
    /// Where to start a partition for which the group has committed nothing.
    pub start: OffsetSpec,
    /// Which replica to read from.
    pub replica: ReplicaChoice,
    /// Longest wait of one [`GroupConsumer::poll`] for new records.
    pub max_wait: Duration,
    /// Soft bound on the bytes fetched per partition and poll.
    pub max_bytes: u32,
}

impl GroupConfig {
    pub fn new(group: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            group: group.into(),
            topics,
            session_timeout: Duration::from_secs(10),
            assignor: "cooperative-sticky".into(),
            start: OffsetSpec::Earliest,
            replica: ReplicaChoice::Leader,
            max_wait: Duration::from_millis(500),
            max_bytes: 1 << 20,
        }
    }
}

/// Told when partitions arrive (with the offset consumption starts at) and before they leave
/// (to finish work before the commit).
pub trait RebalanceListener: Send {
    fn on_assigned(&mut self, _partitions: &[(TopicPartition, u64)]) {}
    fn on_revoked(&mut self, _partitions: &[TopicPartition]) {}
}

/// One record delivered by [`GroupConsumer::poll`].
#[derive(Debug, Clone)]
pub struct Delivered {
    pub topic: String,
    pub partition: u32,
    pub record: pb::FetchedRecord,
}

#[derive(Debug, Clone, Copy)]
struct Position {
    /// The next offset to deliver.
    next: u64,
    /// What the group has committed (as far as this member knows).
    committed: Option<u64>,
}

pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    member_id: String,
    generation: u64,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
    last_heartbeat_ok: Instant,
    owned: BTreeMap<TopicPartition, Position>,
    listener: Option<Box<dyn RebalanceListener>>,
    async_commit: Option<JoinHandle<Result<Offsets>>>,
}

impl GroupConsumer {
    /// Joins the group.
    pub async fn join(client: Client, config: GroupConfig) -> Result<Self> {
        Self::join_with(client, config, None).await
    }

    /// Joins the group, with a listener that hears of the first assignment too.
    pub async fn join_with(
        client: Client,
        config: GroupConfig,
        listener: Option<Box<dyn RebalanceListener>>,
    ) -> Result<Self> {
        let mut c = Self {
            client,
            config,
            member_id: String::new(),
            generation: 0,
            heartbeat_every: Duration::from_millis(100),
            next_heartbeat: Instant::now(),
            last_heartbeat_ok: Instant::now(),
            owned: BTreeMap::new(),
            listener,
            async_commit: None,
        };
        c.rejoin().await?;
        Ok(c)
    }

    pub fn set_listener(&mut self, listener: Box<dyn RebalanceListener>) {
        self.listener = Some(listener);
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The partitions this member consumes now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.keys().cloned().collect()
    }

    /// Sets the position of an owned partition (Kafka's `seek`): the next poll reads from
    /// `offset`, and the next commit records it. Returns false if the member does not own `tp`.
    pub fn seek(&mut self, tp: &TopicPartition, offset: u64) -> bool {
        match self.owned.get_mut(tp) {
            Some(p) => {
                p.next = offset;
                true
            }
            None => false,
        }
    }

    /// Heartbeats if one is due, without fetching anything: for a member that reads its
    /// partitions some other way and only needs to stay in the group.
    pub async fn keep_alive(&mut self) -> Result<()> {
        self.finish_async_commit(false).await;
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await?;
        }
        Ok(())
    }

    /// Runs a group call against the brokers in turn until one answers.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnMut(GroupsClient<crate::client::Chan>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut f = f;
        self.client.call_any_channel(what, |ch| f(GroupsClient::new(ch))).await
    }

    async fn rejoin(&mut self) -> Result<()> {
        self.revoke_all(false).await;
        let req = pb::JoinGroupRequest {
            group: self.config.group.clone(),
            topics: self.config.topics.clone(),
            session_timeout_ms: self.config.session_timeout.as_millis() as u32,
            assignor: self.config.assignor.clone(),
        };
        let a = self
            .call("join group", |mut c| {
                let r = self.client.request(req.clone());
                async move { c.join_group(r).await }
            })
            .await?;
        info!(group = %self.config.group, member = %a.member_id, generation = a.generation, "joined the group");
        self.member_id = a.member_id.clone();
        self.last_heartbeat_ok = Instant::now();
        self.apply(a).await
    }

    /// Gives up every partition; commits them first when `commit` (a member still in the group).
    async fn revoke_all(&mut self, commit: bool) {
        if self.owned.is_empty() {
            return;
        }
        let all: Vec<TopicPartition> = self.owned.keys().cloned().collect();
        if let Some(l) = self.listener.as_mut() {
            l.on_revoked(&all);
        }
        if commit && let Err(e) = self.commit_partitions(&all).await {
            warn!(group = %self.config.group, "commit before giving up partitions failed: {e}");
        }
        self.owned.clear();
    }

    async fn heartbeat(&mut self) -> Result<()> {
        let req = pb::HeartbeatRequest {
            group: self.config.group.clone(),
            member_id: self.member_id.clone(),
            generation: self.generation,
            owned: self
                .owned
                .keys()
                .map(|(topic, partition)| pb::TopicPartition { topic: topic.clone(), partition: *partition })
                .collect(),
        };
        let r = self
            .call("heartbeat", |mut c| {
                let r = self.client.request(req.clone());
                async move { c.heartbeat(r).await }
            })
            .await;
        match r {
            Ok(a) => {
                self.last_heartbeat_ok = Instant::now();
                self.apply(a).await
            }
            Err(e) if matches!(e.code(), Some(error_codes::FENCED | error_codes::UNKNOWN_GROUP)) => {
                info!(group = %self.config.group, member = %self.member_id, "{e}; joining again");
                self.rejoin().await
            }
            Err(e) => {
                // Past the session timeout the coordinator has surely given our partitions to
                // someone else: stop consuming them.
                if self.last_heartbeat_ok.elapsed() > self.config.session_timeout {
                    warn!(group = %self.config.group, "no heartbeat answered within the session timeout: {e}");
                    self.revoke_all(false).await;
                }
                self.next_heartbeat = Instant::now() + self.heartbeat_every;
                Err(e)
            }
        }
    }

    /// Takes on an assignment: gives up what left it (committing first), then starts on what
    /// arrived, from the group's committed offsets.
    async fn apply(&mut self, a: pb::GroupAssignment) -> Result<()> {
        self.generation = a.generation;
        self.heartbeat_every = Duration::from_millis(a.heartbeat_interval_ms.max(10).into());
        let assigned: BTreeSet<TopicPartition> =
            a.assigned.into_iter().map(|tp| (tp.topic, tp.partition)).collect();
        let revoked: Vec<TopicPartition> =
            self.owned.keys().filter(|tp| !assigned.contains(*tp)).cloned().collect();
        let added: Vec<TopicPartition> =
            assigned.iter().filter(|tp| !self.owned.contains_key(*tp)).cloned().collect();
        if !revoked.is_empty() {
            debug!(group = %self.config.group, ?revoked, "giving up partitions");
            if let Some(l) = self.listener.as_mut() {
                l.on_revoked(&revoked);
            }
            if let Err(e) = self.commit_partitions(&revoked).await {
                warn!(group = %self.config.group, "commit of revoked partitions failed: {e}");
            }
            for tp in &revoked {
                self.owned.remove(tp);
            }
        }
        if !added.is_empty() {
            let start = self.start_positions(&added).await?;
            debug!(group = %self.config.group, ?start, "taking partitions");
            if let Some(l) = self.listener.as_mut() {
                let starts: Vec<(TopicPartition, u64)> =
                    start.iter().map(|(tp, p)| (tp.clone(), p.next)).collect();
                l.on_assigned(&starts);
            }
            self.owned.extend(start);
        }
        // Report a change at once, so that partitions move (or the group syncs) quickly.
        let changed = !revoked.is_empty() || !added.is_empty();
        self.next_heartbeat = Instant::now() + if changed { Duration::ZERO } else { self.heartbeat_every };
        Ok(())
    }

    async fn start_positions(&self, tps: &[TopicPartition]) -> Result<Vec<(TopicPartition, Position)>> {
        // Linearizable: reflects every commit acknowledged so far, in particular the previous
        // owner's last one.
        let req = pb::FetchOffsetsRequest {
            group: self.config.group.clone(),
            topics: self.config.topics.clone(),
            linearizable: true,
        };
        let committed: BTreeMap<TopicPartition, u64> = self
            .call("fetch offsets", |mut c| {
                let r = self.client.request(req.clone());
                async move { c.fetch_offsets(r).await }
            })
            .await?
            .offsets
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.offset))
            .collect();
        // Partitions without a commit are looked up concurrently: a member that takes
        // thousands of partitions must not spend its session timeout on one lookup at a time.
        let lookups = tps.iter().map(|tp| {
            let c = committed.get(tp).copied();
            async move {
                let next = match c {
                    Some(c) => c,
                    None => self.client.list_offsets(&tp.0, tp.1, self.config.start).await?.offset,
                };
                Ok::<_, crate::error::ClientError>((tp.clone(), Position { next, committed: c }))
            }
        });
        futures::stream::iter(lookups).buffered(START_LOOKUPS_MAX).try_collect().await
    }

    /// Keeps the session alive and returns the next records of the member's partitions (none
    /// if nothing arrived within the configured wait).
    pub async fn poll(&mut self) -> Result<Vec<Delivered>> {
        self.finish_async_commit(false).await;
        if Instant::now() >= self.next_heartbeat
            && let Err(e) = self.heartbeat().await
        {
            debug!(group = %self.config.group, "heartbeat failed: {e}");
        }
        let until_heartbeat = self.next_heartbeat.saturating_duration_since(Instant::now());
        let wait = self.config.max_wait.min(until_heartbeat);
        if self.owned.is_empty() {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let fetches = self.owned.iter().map(|((topic, partition), pos)| {
            let client = self.client.clone();
            let (topic, partition, offset) = (topic.clone(), *partition, pos.next);
            let (replica, max_bytes) = (self.config.replica, self.config.max_bytes);
            async move {
                let r = client.fetch(&topic, partition, offset, replica, max_bytes, wait).await;
                ((topic, partition), r)
            }
        });
        let mut out = Vec::new();
        for (tp, r) in join_all(fetches).await {
            let Some(pos) = self.owned.get_mut(&tp) else { continue };
            match r {
                Ok(resp) => {
                    for record in resp.records {
                        if record.offset < pos.next {
                            continue;
                        }
                        pos.next = record.offset + 1;
                        out.push(Delivered { topic: tp.0.clone(), partition: tp.1, record });
                    }
                }
                Err(e) if e.code() == Some(error_codes::OFFSET_OUT_OF_RANGE) => {
                    // Retention removed what the group had not read yet: go on from the log
                    // start, as Kafka's auto.offset.reset=earliest does. The earliest offset any
                    // replica still has: a replica that installed a snapshot starts later than
                    // the partition, and skipping to its start lost events the others still
                    // served (simulator seed 40 with --retention).
                    let replicas = self
                        .client
                        .metadata()
                        .partition(&tp.0, tp.1)
                        .map(|p| p.replicas.clone())
                        .unwrap_or_default();
                    let asks = replicas.iter().map(|n| {
                        self.client.list_offsets_on(
                            &tp.0,
                            tp.1,
                            OffsetSpec::Earliest,
                            ReplicaChoice::Node(*n),
                        )
                    });
                    let starts: Vec<u64> =
                        join_all(asks).await.into_iter().flatten().map(|r| r.offset).collect();
                    match starts.iter().min() {
                        Some(start) if *start > pos.next => {
                            warn!(partition = ?tp, from = pos.next, to = start, "offsets removed by retention; skipping to the log start");
                            pos.next = *start;
                        }
                        Some(_) => {}
                        None => {
                            debug!(partition = ?tp, "looking up the log start failed: no replica answered")
                        }
                    }
                }
                Err(e) => debug!(partition = ?tp, "fetch failed: {e}"),
            }
        }
        Ok(out)
    }

    fn pending(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, u64)> {
        tps.iter()
            .filter_map(|tp| {
                let p = self.owned.get(tp)?;
                (p.committed != Some(p.next) && (p.committed.is_some() || p.next > 0))
                    .then(|| (tp.clone(), p.next))
            })
            .collect()
    }

    async fn commit_partitions(&mut self, tps: &[TopicPartition]) -> Result<Offsets> {
        let offsets = self.pending(tps);
        if offsets.is_empty() {
            return Ok(offsets);
        }
        commit(&self.client, &self.config.group, &self.member_id, &offsets).await?;
        self.mark_committed(&offsets);
        Ok(offsets)
    }

    fn mark_committed(&mut self, offsets: &[(TopicPartition, u64)]) {
        for (tp, o) in offsets {
            if let Some(p) = self.owned.get_mut(tp) {
                p.committed = Some(p.committed.map_or(*o, |c| c.max(*o)));
            }
        }
    }

    /// Commits the positions of every partition this member consumes, and waits for it;
    /// returns the offsets it committed (none when nothing moved since the last commit).
    pub async fn commit_sync(&mut self) -> Result<Offsets> {
        self.finish_async_commit(true).await;
        let all: Vec<TopicPartition> = self.owned.keys().cloned().collect();
        self.commit_partitions(&all).await
    }

    /// Starts committing the current positions and returns at once; the outcome is noted by a
    /// later poll or commit. A commit still running is not doubled.
    pub fn commit_async(&mut self) {
        if self.async_commit.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let all: Vec<TopicPartition> = self.owned.keys().cloned().collect();
        let offsets = self.pending(&all);
        if offsets.is_empty() {
            return;
        }
        let (client, group, member) =
            (self.client.clone(), self.config.group.clone(), self.member_id.clone());
        self.async_commit = Some(tokio::spawn(async move {
            commit(&client, &group, &member, &offsets).await?;
            Ok(offsets)
        }));
    }

    async fn finish_async_commit(&mut self, wait: bool) {
        let done = self.async_commit.as_ref().is_some_and(|h| h.is_finished());
        if !(done || wait) {
            return;
        }
        let Some(h) = self.async_commit.take() else { return };
        match h.await {
            Ok(Ok(offsets)) => self.mark_committed(&offsets),
            Ok(Err(e)) => warn!(group = %self.config.group, "asynchronous commit failed: {e}"),
            Err(e) => warn!(group = %self.config.group, "asynchronous commit task failed: {e}"),
        }
    }

    /// Commits, then leaves the group so its partitions move at once.
    pub async fn close(mut self) -> Result<()> {
        let committed = self.commit_sync().await;
        let req =
            pb::LeaveGroupRequest { group: self.config.group.clone(), member_id: self.member_id.clone() };
        self.call("leave group", |mut c| {
            let r = self.client.request(req.clone());
            async move { c.leave_group(r).await }
        })
        .await?;
        committed.map(|_| ())
    }
}

fn to_pb_offsets(offsets: &[(TopicPartition, u64)]) -> Vec<pb::PartitionOffset> {
    offsets
        .iter()
        .map(|((topic, partition), offset)| pb::PartitionOffset {
            topic: topic.clone(),
            partition: *partition,
            offset: *offset,
        })
        .collect()
}

async fn commit(client: &Client, group: &str, member: &str, offsets: &[(TopicPartition, u64)]) -> Result<()> {
    let req = pb::CommitOffsetsRequest {
        group: group.to_owned(),
        member_id: member.to_owned(),
        offsets: to_pb_offsets(offsets),
    };
    client
        .call_any_channel("commit offsets", |ch| {
            let mut c = GroupsClient::new(ch);
            let r = client.request(req.clone());
            async move { c.commit_offsets(r).await }
        })
        .await
        .map(|_| ())
}

/// Group administration, for operators and tools.
impl Client {
    pub async fn list_groups(&self) -> Result<Vec<pb::GroupSummary>> {
        self.call_any_channel("list groups", |ch| {
            let r = self.request(pb::ListGroupsRequest {});
            async move { GroupsClient::new(ch).list_groups(r).await }
        })
        .await
        .map(|r| r.groups)
    }

    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupResponse> {
        let req = pb::DescribeGroupRequest { group: group.to_owned() };
        self.call_any_channel("describe group", |ch| {
            let r = self.request(req.clone());
            async move { GroupsClient::new(ch).describe_group(r).await }
        })
        .await
    }

    /// Sets the group's committed offsets (backwards too); the group must have no members.
    pub async fn reset_offsets(&self, group: &str, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let req = pb::ResetOffsetsRequest { group: group.to_owned(), offsets: to_pb_offsets(offsets) };
        self.call_any_channel("reset offsets", |ch| {
            let r = self.request(req.clone());
            async move { GroupsClient::new(ch).reset_offsets(r).await }
        })
        .await
        .map(|_| ())
    }

    /// The group's committed offsets; `linearizable` reads through the metadata leader.
    pub async fn fetch_group_offsets(&self, group: &str, linearizable: bool) -> Result<Offsets> {
        let req = pb::FetchOffsetsRequest { group: group.to_owned(), topics: vec![], linearizable };
        let r = self
            .call_any_channel("fetch offsets", |ch| {
                let r = self.request(req.clone());
                async move { GroupsClient::new(ch).fetch_offsets(r).await }
            })
            .await?;
        Ok(r.offsets.into_iter().map(|o| ((o.topic, o.partition), o.offset)).collect())
    }

    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let req = pb::DeleteGroupRequest { group: group.to_owned() };
        self.call_any_channel("delete group", |ch| {
            let r = self.request(req.clone());
            async move { GroupsClient::new(ch).delete_group(r).await }
        })
        .await
        .map(|_| ())
    }
}
