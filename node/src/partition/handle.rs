//! [`PartitionHandle`]: a running partition replica as the client services see it.
//!
//! Produce goes through Raft on the leader and returns once the batch is committed (on a quorum
//! of disks) and applied. While a partition's proposal is in flight, further produce requests
//! queue and are proposed together in one entry when it is answered (group commit: one Raft
//! round for all of them, each with its own sequence check and reply). Fetch reads this replica's own log through the offset index, never
//! past the applied high watermark, so any replica can serve it without talking to the leader.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use eddy_raft::C;
use eddy_raft::GroupId;
use eddy_raft::NodeId;
use eddy_raft::Payload;
use eddy_raft::kv::BufferedTree;
use eddy_raft::kv::KvTree;
use eddy_raft::liveness::Liveness;
use eddy_raft::log::LogReader;
use openraft::EntryPayload;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::ForwardReason;
use openraft::errors::RaftError;
use openraft::raft::ClientWriteResponse;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tracing::debug;

use super::command::PartitionCommand;
use super::command::PartitionReply;
use super::command::ProduceBatch;
use super::command::StoredRecord;
use super::sm::PartitionStateMachine;
use super::sm::Progress;
use super::state::IndexEntry;
use super::state::first_batch_at_or_after;
use super::state::offset_key;
use crate::error::BrokerError;
use crate::error::Result;
use crate::meta::MetaHandle;

pub type PartitionRaft = openraft::Raft<C, PartitionStateMachine>;

/// How long a leader waits for a quorum to renew its lease before a write.
const LEASE_RENEW_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a write to a replica whose leader is gone waits for the group to elect a new one
/// (see `PartitionHandle::write`). Below clients' usual request deadlines (1 s and more), so the
/// client hears an answer (the new leader, or `not_leader` to retry) rather than a timeout.
pub const LEADER_WAIT: Duration = Duration::from_millis(500);

/// Offset-index entries read per scan while serving a fetch.
const INDEX_SCAN_MAX: usize = 1024;

/// Produce proposals of one partition in Raft at once. A request that finds this many in
/// flight queues; when the proposal is answered, everything queued is proposed, coalesced into
/// as few entries as the batches allow. One keeps each Raft round as full as the load makes it,
/// and an idle partition's request is proposed at once, by the request's own task.
const PROPOSALS_IN_FLIGHT_MAX: usize = 1;
/// Most record bytes coalesced into one entry (a larger request still goes alone).
const COALESCE_BYTES_MAX: usize = 1 << 20;
/// Most requests coalesced into one entry.
const COALESCE_BATCHES_MAX: usize = 256;

/// A produce request queued behind the partition's proposal in flight.
struct Waiting {
    batch: ProduceBatch,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<PartitionReply>>,
    /// Whether the batch was refused once for overtaking (see [`overtook`]) and queued again.
    retried: bool,
}

/// Whether a batch was refused only because it reached the leader before an earlier batch of
/// its producer: pipelined requests travel on separate HTTP/2 streams, so the order in which
/// the leader starts them is not the order they were sent in. Such a batch is queued once more
/// (behind the gap's filler, which is usually already queued) instead of being refused to the
/// client, who would otherwise resend it, and every batch it sent after it, one by one.
fn overtook(reply: &PartitionReply) -> bool {
    match *reply {
        PartitionReply::OutOfOrderSequence { expected, got } => got > expected,
        PartitionReply::UnknownProducer { got } => got > 0,
        _ => false,
    }
}

/// The partition's produce proposals: how many are in Raft, and the requests queued behind them.
#[derive(Default)]
struct Proposals {
    in_flight: usize,
    queue: Vec<Waiting>,
}

/// A proposal slot held by a request's task; released (handing the queue on) when dropped, so a
/// request whose client goes away mid-write still frees it.
struct Slot<'a>(&'a PartitionHandle);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release_slot();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub base_offset: u64,
    pub count: u32,
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRecord {
    pub offset: u64,
    pub record: StoredRecord,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub records: Vec<FetchedRecord>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub next_offset: u64,
}

/// Which offset [`PartitionHandle::list_offset`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark: the offset the next record gets.
    Latest,
    /// The first offset whose record timestamp is at or after this (milliseconds since the
    /// Unix epoch); the high watermark when there is none.
    Timestamp(i64),
}

/// The answer of [`PartitionHandle::list_offset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffset {
    pub offset: u64,
    /// The timestamp of the record at `offset`, for a timestamp lookup that found one.
    pub timestamp_ms: Option<i64>,
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

/// How often a lookup retries when retention moves the log start under it.
const LOOKUP_ATTEMPTS_MAX: usize = 3;

/// A partition's status on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub leader: Option<NodeId>,
    pub term: u64,
    pub is_leader: bool,
    pub progress: Progress,
}

/// Everything a partition replica's handle is made of.
pub struct PartitionParts {
    pub topic: String,
    pub partition: u32,
    pub group: GroupId,
    pub me: NodeId,
    pub raft: PartitionRaft,
    pub progress: watch::Receiver<Progress>,
    pub index: Arc<BufferedTree>,
    pub log: LogReader,
    pub meta: MetaHandle,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    pub liveness: Arc<Liveness>,
    /// Stops the replica's own tasks (retention) when the replica stops.
    pub stop: tokio_util::sync::CancellationToken,
    /// The topic's retention settings, kept current by the partition manager; the retention
    /// task sleeps on it while the topic keeps everything.
    pub retention: watch::Sender<super::retention::TopicSettings>,
    #[cfg(feature = "planted-bugs")]
    pub bugs: crate::env::PlantedBugs,
}

#[derive(Clone)]
pub struct PartitionHandle {
    inner: Arc<PartitionParts>,
    proposals: Arc<Mutex<Proposals>>,
}

impl PartitionHandle {
    pub fn new(parts: PartitionParts) -> Self {
        Self { inner: Arc::new(parts), proposals: Default::default() }
    }

    /// The replica's Raft log, for inspection (the simulator's checker compares replicas).
    pub fn log_reader(&self) -> &LogReader {
        &self.inner.log
    }

    pub fn raft(&self) -> &PartitionRaft {
        &self.inner.raft
    }

    pub(super) fn parts(&self) -> &PartitionParts {
        &self.inner
    }

    /// Tells the replica's retention task the topic's current settings (a no-op if unchanged).
    pub fn set_retention(&self, settings: super::retention::TopicSettings) {
        self.inner.retention.send_if_modified(|s| std::mem::replace(s, settings) != settings);
    }

    /// Stops the replica's tasks; the Raft group itself is shut down by its owner.
    pub fn stop_tasks(&self) {
        self.inner.stop.cancel();
    }

    /// Waits for a persist of the replica's state under way and stops every later one: called
    /// before the state store drops the replica's tree.
    pub fn close_state(&self) {
        self.inner.index.close();
    }

    pub fn stop_token(&self) -> tokio_util::sync::CancellationToken {
        self.inner.stop.clone()
    }

    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    fn what(&self) -> String {
        format!("{}/{}", self.inner.topic, self.inner.partition)
    }

    pub fn status(&self) -> ReplicaStatus {
        // Read in place: cloning the metrics (maps of followers, the membership) for two fields
        // showed in profiles of every path that asks.
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        ReplicaStatus {
            leader: m.current_leader,
            term: m.current_term,
            is_leader: m.current_leader == Some(self.inner.me),
            progress: *self.inner.progress.borrow(),
        }
    }

    /// Whether `offset` lies past the end of this partition's log for certain: past what this
    /// replica has applied, where this replica is a follower (it may only lag the leader: a
    /// Kafka consumer then goes back to the leader, as KIP-392 has it) or a leader that has
    /// applied an entry of its own term. A new leader that has not may not have applied all
    /// that its predecessor acknowledged yet, so a consumer's position past its end is no
    /// proof of anything there.
    pub fn past_end(&self, offset: u64) -> bool {
        let settled = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow_watched();
            m.current_leader != Some(self.inner.me)
                || m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term)
        };
        // Read after the metrics: what they report applied, the progress already shows.
        settled && offset > self.inner.progress.borrow().next_offset
    }

    pub fn log_bytes(&self) -> u64 {
        self.inner.log.bytes()
    }

    /// The `not_leader` error for this partition, naming `leader` (if it is another node).
    pub fn not_leader(&self, leader: Option<NodeId>) -> BrokerError {
        // A leader judged down is no hint: the client would only try a dead node.
        let leader = leader.filter(|l| *l != self.inner.me && self.inner.liveness.is_alive(*l));
        let leader_addr = leader
            .and_then(|l| self.inner.meta.view().state.nodes.get(&l).map(|n| n.addr.client_addr.clone()));
        BrokerError::NotLeader { what: self.what(), me: self.inner.me, leader, leader_addr }
    }

    /// Appends a batch; returns once it is committed and applied (or refused).
    pub async fn produce(&self, batch: ProduceBatch, timeout: Duration) -> Result<Produced> {
        let producer_id = batch.producer_id;
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        // Either this request proposes its batch itself, or it queues and waits for a reply.
        let turn = {
            let mut p = self.proposals.lock().expect("proposals lock poisoned");
            if p.in_flight < PROPOSALS_IN_FLIGHT_MAX {
                p.in_flight += 1;
                Ok(batch)
            } else {
                let (tx, rx) = oneshot::channel();
                p.queue.push(Waiting { batch, deadline, reply: tx, retried: false });
                Err(rx)
            }
        };
        let reply = match turn {
            Ok(batch) => {
                let slot = Slot(self);
                let command = PartitionCommand::Produce(batch);
                match self.propose(&command, timeout).await {
                    Ok(r) if overtook(&r) => {
                        // Another request of this producer is about to fill the gap.
                        let PartitionCommand::Produce(batch) = command else { unreachable!() };
                        let (tx, rx) = oneshot::channel();
                        self.go_again(
                            &mut self.proposals.lock().expect("proposals lock poisoned"),
                            batch,
                            deadline,
                            tx,
                        );
                        drop(slot);
                        self.queued(rx, deadline, timeout).await
                    }
                    r => r,
                }
            }
            Err(rx) => self.queued(rx, deadline, timeout).await,
        };
        if reply.is_ok() {
            self.inner.metrics.commit_latency.observe(started.elapsed().as_secs_f64());
        }
        Self::produced(reply?, producer_id)
    }

    /// Queues a batch refused for overtaking (see [`overtook`]) once more, behind the request
    /// that fills its gap (the queue is proposed in sequence order).
    fn go_again(
        &self,
        p: &mut Proposals,
        batch: ProduceBatch,
        deadline: tokio::time::Instant,
        reply: oneshot::Sender<Result<PartitionReply>>,
    ) {
        debug!(group = self.inner.group, "a batch that overtook an earlier one goes again");
        p.queue.push(Waiting { batch, deadline, reply, retried: true });
    }

    /// Waits for the reply to a queued request.
    async fn queued(
        &self,
        rx: oneshot::Receiver<Result<PartitionReply>>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<PartitionReply> {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(BrokerError::Unavailable(format!(
                "{}: the replica stopped while the batch was queued; it may or may not be written \
                 (an idempotent producer can retry safely)",
                self.what()
            ))),
            Err(_) => Err(self.timed_out(timeout)),
        }
    }

    fn timed_out(&self, timeout: Duration) -> BrokerError {
        BrokerError::Timeout(format!(
            "{}: the batch was not committed within {timeout:?}; it may or may not be written \
             (an idempotent producer can retry safely)",
            self.what()
        ))
    }

    /// Gives up a proposal slot; if requests are queued, a task of their own proposes them
    /// (keeping the slot) until the queue is empty.
    fn release_slot(&self) {
        let waiting = {
            let mut p = self.proposals.lock().expect("proposals lock poisoned");
            if p.queue.is_empty() {
                p.in_flight -= 1;
                return;
            }
            std::mem::take(&mut p.queue)
        };
        // Outside a runtime (it is shutting down) the queued requests are dropped, and their
        // callers hear that the replica stopped.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = self.clone();
            rt.spawn(async move { this.drain(waiting).await });
        }
    }

    async fn drain(self, mut waiting: Vec<Waiting>) {
        loop {
            self.propose_queued(waiting).await;
            let mut p = self.proposals.lock().expect("proposals lock poisoned");
            if p.queue.is_empty() {
                p.in_flight -= 1;
                return;
            }
            waiting = std::mem::take(&mut p.queue);
        }
    }

    /// Proposes queued requests, a producer's batches in sequence order, coalesced into as few
    /// entries as [`ProduceBatch::coalescible`] and the size bounds allow.
    async fn propose_queued(&self, mut waiting: Vec<Waiting>) {
        waiting.retain(|w| !w.reply.is_closed());
        // Stable: non-idempotent batches (producer 0) keep their arrival order.
        waiting.sort_by_key(|w| (w.batch.producer_id, w.batch.base_sequence));
        let mut groups: Vec<Vec<Waiting>> = Vec::new();
        let mut bytes = 0usize;
        for w in waiting {
            let size = w.batch.records.iter().map(StoredRecord::size).sum::<usize>();
            match groups.last_mut() {
                Some(g)
                    if g.len() < COALESCE_BATCHES_MAX
                        && bytes + size <= COALESCE_BYTES_MAX
                        && g.last().is_some_and(|l| l.batch.coalescible(&w.batch)) =>
                {
                    bytes += size;
                    g.push(w);
                }
                _ => {
                    bytes = size;
                    groups.push(vec![w]);
                }
            }
        }
        // `join_all` polls the writes in order, so they reach Raft in this order.
        futures::future::join_all(groups.into_iter().map(|g| self.propose_group(g))).await;
    }

    async fn propose_group(&self, group: Vec<Waiting>) {
        let now = tokio::time::Instant::now();
        let timeout = group.iter().map(|w| w.deadline).max().map_or(Duration::ZERO, |d| d - now);
        let mut batches = Vec::with_capacity(group.len());
        let mut waiters = Vec::with_capacity(group.len());
        for w in group {
            batches.push(w.batch);
            waiters.push((w.deadline, w.reply, w.retried));
        }
        let n = waiters.len();
        if n > 1 {
            debug!(group = self.inner.group, batches = n, "proposing queued produce requests in one entry");
        }
        let command = match batches.len() {
            1 => PartitionCommand::Produce(batches.pop().expect("one batch")),
            _ => PartitionCommand::ProduceBatches(batches),
        };
        let each = match self.propose(&command, timeout).await {
            Ok(PartitionReply::Batches(each)) if each.len() == n => each,
            Ok(r) if n == 1 => vec![r],
            r => {
                let e = match r {
                    Ok(r) => BrokerError::Internal(format!("{n} batches were applied with the reply {r:?}")),
                    Err(e) => e,
                };
                for (_, tx, _) in waiters {
                    let _ = tx.send(Err(e.clone()));
                }
                return;
            }
        };
        let batches = match command {
            PartitionCommand::Produce(b) => vec![b],
            PartitionCommand::ProduceBatches(bs) => bs,
            PartitionCommand::AdvanceLogStart { .. } => unreachable!("a produce command"),
        };
        let mut p = self.proposals.lock().expect("proposals lock poisoned");
        for ((batch, (deadline, tx, retried)), r) in batches.into_iter().zip(waiters).zip(each) {
            if overtook(&r) && !retried {
                self.go_again(&mut p, batch, deadline, tx);
            } else {
                let _ = tx.send(Ok(r));
            }
        }
    }

    /// Proposes a produce command and waits (up to `timeout`) for its reply.
    async fn propose(&self, command: &PartitionCommand, timeout: Duration) -> Result<PartitionReply> {
        self.inner.metrics.produce_entries.inc();
        let batches = match command {
            PartitionCommand::Produce(_) => 1,
            PartitionCommand::ProduceBatches(bs) => bs.len() as u64,
            PartitionCommand::AdvanceLogStart { .. } => 0,
        };
        self.inner.metrics.produce_entry_batches.inc_by(batches);
        let write = self.write(Payload(command.encode()));
        let resp = match tokio::time::timeout(timeout, write).await {
            Err(_) => return Err(self.timed_out(timeout)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                return Err(self.not_leader(f.leader_id));
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)))) => {
                // The entry was dropped by a new leader: it may or may not have committed.
                let _ = f;
                return Err(BrokerError::Unavailable(format!(
                    "{}: leadership changed while the batch was in flight; it may or may not be written \
                     (an idempotent producer can retry safely)",
                    self.what()
                )));
            }
            Ok(Err(e)) => return Err(BrokerError::Unavailable(format!("{}: {e}", self.what()))),
            Ok(Ok(r)) => r,
        };
        PartitionReply::decode(&resp.data.0)
            .map_err(|e| BrokerError::Internal(format!("undecodable partition reply: {e}")))
    }

    /// A batch's reply as the client hears it.
    fn produced(reply: PartitionReply, producer_id: u64) -> Result<Produced> {
        match reply {
            PartitionReply::Produced { base_offset, count, duplicate } => {
                Ok(Produced { base_offset, count, duplicate })
            }
            PartitionReply::OutOfOrderSequence { expected, got } => {
                Err(BrokerError::OutOfOrderSequence { producer_id, expected, got })
            }
            PartitionReply::UnknownProducer { got } => Err(BrokerError::UnknownProducer { producer_id, got }),
            PartitionReply::Invalid(msg) => Err(BrokerError::InvalidArgument(msg)),
            PartitionReply::Done | PartitionReply::LogStart { .. } | PartitionReply::Batches(_) => {
                Err(BrokerError::Internal("produce applied without a result".into()))
            }
        }
    }

    /// Reads committed records from `offset`, waiting up to `max_wait` for one to exist.
    pub async fn fetch(
        &self,
        offset: u64,
        max_bytes: usize,
        max_records: usize,
        max_wait: Duration,
    ) -> Result<Fetched> {
        let mut rx = self.inner.progress.clone();
        let p = *rx.borrow_and_update();
        if offset < p.log_start_offset {
            return Err(BrokerError::OffsetOutOfRange {
                what: self.what(),
                offset,
                log_start: p.log_start_offset,
            });
        }
        if offset >= p.next_offset && !max_wait.is_zero() {
            // Cancel-safe: waiting on a watch only observes values.
            let _ = tokio::time::timeout(max_wait, rx.wait_for(|p| p.next_offset > offset)).await;
        }
        let p = *rx.borrow();
        let mut out = Fetched {
            records: Vec::new(),
            high_watermark: p.next_offset,
            log_start_offset: p.log_start_offset,
            next_offset: offset,
        };
        if offset < p.next_offset
            && let Err(e) = self.read(offset, p.next_offset, max_bytes, max_records, &mut out)
        {
            // Retention may have advanced the log start (and purged the log) during the read.
            let log_start = self.inner.progress.borrow().log_start_offset;
            if offset < log_start {
                return Err(BrokerError::OffsetOutOfRange { what: self.what(), offset, log_start });
            }
            return Err(e);
        }
        #[cfg(feature = "planted-bugs")]
        if self.inner.bugs.follower_reads_uncommitted && !self.status().is_leader {
            self.read_uncommitted(offset, p, max_records, &mut out)?;
        }
        Ok(out)
    }

    /// Proposes a command. A quiescent leader exchanged nothing with its followers for a while,
    /// so openraft's quorum lease (which a leader needs to accept writes) has lapsed: the first
    /// write after a quiet spell renews it with one heartbeat round, then is proposed again.
    /// The lease runs from when the heartbeat was *sent* (for `election_timeout_max`), so on a
    /// node busy with a thousand such renewals it can lapse again before the write is proposed:
    /// the write then renews again for as long as a quorum answers, within the caller's
    /// deadline. (Answering the client instead made it refresh its metadata and retry, and at
    /// 1,000 partitions those retries kept the nodes too busy for renewals to succeed: the first
    /// writes took 17 s at the median.)
    ///
    /// A replica that does not lead, and whose leader is gone or suspected by node liveness (or
    /// that knows no leader), waits up to [`LEADER_WAIT`] for the group to elect one: if it wins
    /// itself, the write goes ahead here; otherwise the caller is sent to the new leader. A
    /// client whose partition leader died thus learns the new one the moment it is elected,
    /// instead of polling metadata until the cluster's status shows it.
    async fn write(
        &self,
        payload: Payload,
    ) -> std::result::Result<ClientWriteResponse<C>, RaftError<C, ClientWriteError<C>>> {
        let raft = &self.inner.raft;
        let mut waited = false;
        loop {
            match raft.client_write(payload.clone()).await {
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.reason == ForwardReason::LeaseExpired =>
                {
                    if !self.renew_lease().await {
                        return Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)));
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.reason == ForwardReason::NotLeader
                        && !waited
                        && self.leader_missing(f.leader_id) =>
                {
                    waited = true;
                    if !self.wait_for_leader().await {
                        return Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)));
                    }
                }
                r => return r,
            }
        }
    }

    /// Whether `leader` (this replica's belief) is no leader to send a client to: unknown, or
    /// another node that liveness judges down or suspects.
    fn leader_missing(&self, leader: Option<NodeId>) -> bool {
        let term = self.inner.raft.metrics().borrow_watched().current_term;
        match leader {
            None => true,
            Some(l) => l != self.inner.me && self.inner.liveness.leader_suspected(self.inner.group, l, term),
        }
    }

    /// Waits up to [`LEADER_WAIT`] until this replica knows a leader that is not missing (see
    /// [`Self::leader_missing`]). False if none appeared.
    async fn wait_for_leader(&self) -> bool {
        let mut rx = self.inner.raft.metrics();
        let found = async {
            loop {
                let leader = rx.borrow_watched().current_leader;
                if leader.is_some() && !self.leader_missing(leader) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        // Cancel-safe: the wait only observes the metrics.
        tokio::time::timeout(LEADER_WAIT, found).await.unwrap_or(false)
    }

    /// On a leader, confirms the leadership with a quorum (one heartbeat round), which renews
    /// the leader's lease. False if this replica does not lead or no quorum answered.
    pub async fn renew_lease(&self) -> bool {
        let renew = self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        match tokio::time::timeout(LEASE_RENEW_TIMEOUT, renew).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                debug!(group = self.inner.group, "renewing the leader lease: {e}");
                false
            }
            Err(_) => {
                debug!(group = self.inner.group, "renewing the leader lease timed out");
                false
            }
        }
    }

    /// Proposes retention's new log start (a batch's base offset, or the high watermark) and
    /// returns the log start once applied. Only the leader can.
    pub async fn advance_log_start(&self, offset: u64, timeout: Duration) -> Result<u64> {
        let payload = Payload(PartitionCommand::AdvanceLogStart { offset }.encode());
        let resp = match tokio::time::timeout(timeout, self.write(payload)).await {
            Err(_) => {
                return Err(BrokerError::Timeout(format!(
                    "{}: advancing the log start to {offset} did not commit within {timeout:?}",
                    self.what()
                )));
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                return Err(self.not_leader(f.leader_id));
            }
            Ok(Err(e)) => return Err(BrokerError::Unavailable(format!("{}: {e}", self.what()))),
            Ok(Ok(r)) => r,
        };
        match PartitionReply::decode(&resp.data.0) {
            Ok(PartitionReply::LogStart { log_start_offset }) => Ok(log_start_offset),
            Ok(other) => Err(BrokerError::Internal(format!("advance log start answered {other:?}"))),
            Err(e) => Err(BrokerError::Internal(format!("undecodable partition reply: {e}"))),
        }
    }

    /// Looks an offset up on this replica, from its applied state (no log scan: a timestamp
    /// costs one seek in the time index and one log read).
    pub fn list_offset(&self, spec: OffsetSpec) -> Result<ListedOffset> {
        let mut attempt = 0;
        loop {
            let p = *self.inner.progress.borrow();
            let mut out = ListedOffset {
                offset: p.next_offset,
                timestamp_ms: None,
                log_start_offset: p.log_start_offset,
                high_watermark: p.next_offset,
            };
            let ts = match spec {
                OffsetSpec::Earliest => return Ok(ListedOffset { offset: p.log_start_offset, ..out }),
                OffsetSpec::Latest => return Ok(out),
                OffsetSpec::Timestamp(ts) => ts,
            };
            let found =
                first_batch_at_or_after(self.inner.index.as_ref(), ts, p.log_start_offset, p.next_offset)
                    .and_then(|e| e.map(|e| self.first_record_at_or_after(e, ts)).transpose());
            match found {
                Ok(Some((offset, record_ts))) => {
                    out.offset = offset;
                    out.timestamp_ms = Some(record_ts);
                    return Ok(out);
                }
                Ok(None) => return Ok(out),
                // Retention moved the log start while this looked: look again.
                Err(_) if attempt + 1 < LOOKUP_ATTEMPTS_MAX && *self.inner.progress.borrow() != p => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(BrokerError::Internal(format!("{}: looking up time {ts}: {e}", self.what())));
                }
            }
        }
    }

    /// The offset and timestamp of the first record of batch `e` stamped at or after `ts`.
    fn first_record_at_or_after(&self, e: IndexEntry, ts: i64) -> std::io::Result<(u64, i64)> {
        let entry = self.inner.log.read(e.log_index, e.log_index + 1, 1)?.into_iter().next();
        let Some(EntryPayload::Normal(payload)) = entry.map(|e| e.payload) else {
            return Err(std::io::Error::other("the index points at a non-data entry"));
        };
        let batch = PartitionCommand::decode_batch(&payload.0).map_err(std::io::Error::other)?;
        batch
            .records
            .iter()
            .skip(e.skip as usize)
            .take(e.count as usize)
            .enumerate()
            .find(|(_, r)| r.timestamp_ms >= ts)
            .map(|(i, r)| (e.base_offset + i as u64, r.timestamp_ms))
            .ok_or_else(|| std::io::Error::other("the batch's timestamp header does not match its records"))
    }

    /// The planted bug `follower-reads-uncommitted`: serve the entries past the applied point as
    /// if they were committed, numbering their records as if every batch were accepted.
    #[cfg(feature = "planted-bugs")]
    fn read_uncommitted(
        &self,
        offset: u64,
        p: Progress,
        max_records: usize,
        out: &mut Fetched,
    ) -> Result<()> {
        let internal =
            |e: std::io::Error| BrokerError::Internal(format!("{}: reading the log: {e}", self.what()));
        let start = p.last_applied.map_or(0, |l| l.index + 1);
        let Some(last) = self.inner.log.last_log_id() else {
            return Ok(());
        };
        if last.index < start || out.next_offset < p.next_offset && !out.records.is_empty() {
            return Ok(());
        }
        let entries = self.inner.log.read(start, last.index + 1, 1 << 20).map_err(internal)?;
        let mut o = p.next_offset;
        for e in entries {
            let EntryPayload::Normal(payload) = &e.payload else {
                continue;
            };
            let Ok(batch) = PartitionCommand::decode_batch(&payload.0) else {
                continue;
            };
            for record in batch.records {
                if o >= offset.max(out.next_offset) && out.records.len() < max_records {
                    out.records.push(FetchedRecord { offset: o, record });
                    out.next_offset = o + 1;
                }
                o += 1;
            }
        }
        out.high_watermark = out.high_watermark.max(o);
        Ok(())
    }

    fn read(
        &self,
        offset: u64,
        hw: u64,
        max_bytes: usize,
        max_records: usize,
        out: &mut Fetched,
    ) -> Result<()> {
        let internal =
            |e: std::io::Error| BrokerError::Internal(format!("{}: reading the log: {e}", self.what()));
        let Some((k, _)) = self.inner.index.floor(&offset_key(offset)).map_err(internal)? else {
            return Err(BrokerError::Internal(format!(
                "{}: no index entry at or below offset {offset}",
                self.what()
            )));
        };
        let mut from = k;
        let mut bytes = 0usize;
        // Offsets are dense, so no batch starting at or past `end` is needed, and every batch
        // holds at least one record: read only those batches' log entries.
        let end = offset.saturating_add(max_records as u64).min(hw);
        let scan_max = INDEX_SCAN_MAX.min(max_records.saturating_add(1));
        'scan: loop {
            let entries: Vec<IndexEntry> = self
                .inner
                .index
                .scan(&from, &offset_key(end), scan_max)
                .map_err(internal)?
                .into_iter()
                .map(|(k, v)| IndexEntry::decode_stored(&k, &v))
                .collect::<std::io::Result<_>>()
                .map_err(internal)?;
            let Some(last) = entries.last().copied() else {
                break;
            };
            // Read runs of consecutive log entries with one read each (the batches of an entry
            // holding several share its log index).
            let mut i = 0;
            while i < entries.len() {
                let mut j = i + 1;
                while j < entries.len()
                    && entries[j].log_index.checked_sub(entries[j - 1].log_index).is_some_and(|d| d <= 1)
                {
                    j += 1;
                }
                let run = &entries[i..j];
                let start = run[0].log_index;
                let end = run[run.len() - 1].log_index + 1;
                let logs = self
                    .inner
                    .log
                    .read(start, end, max_bytes.saturating_sub(bytes).max(1))
                    .map_err(internal)?;
                let mut decoded: Option<(u64, Vec<StoredRecord>)> = None;
                for e in run {
                    let Some(log_entry) = logs.get((e.log_index - start) as usize) else {
                        // The byte budget cut the read short.
                        break 'scan;
                    };
                    if decoded.as_ref().is_none_or(|(at, _)| *at != e.log_index) {
                        let EntryPayload::Normal(p) = &log_entry.payload else {
                            return Err(BrokerError::Internal(format!(
                                "{}: index points at a non-data entry",
                                self.what()
                            )));
                        };
                        let batch = PartitionCommand::decode_batch(&p.0)
                            .map_err(|err| BrokerError::Internal(format!("{}: {err}", self.what())))?;
                        decoded = Some((e.log_index, batch.records));
                    }
                    let records = &mut decoded.as_mut().expect("decoded above").1;
                    let held = records.len();
                    let Some(records) = records.get_mut(e.skip as usize..e.skip as usize + e.count as usize)
                    else {
                        return Err(BrokerError::Internal(format!(
                            "{}: the index entry at offset {} names records {}..{} of an entry holding {}",
                            self.what(),
                            e.base_offset,
                            e.skip,
                            e.skip + e.count,
                            held
                        )));
                    };
                    for (k, record) in records.iter_mut().enumerate() {
                        let o = e.base_offset + k as u64;
                        if o < offset {
                            continue;
                        }
                        if o >= hw
                            || out.records.len() >= max_records
                            || (bytes >= max_bytes && !out.records.is_empty())
                        {
                            break 'scan;
                        }
                        bytes += record.size();
                        // Each record is served once per read: move it out.
                        let record = StoredRecord {
                            key: record.key.take(),
                            value: std::mem::take(&mut record.value),
                            headers: std::mem::take(&mut record.headers),
                            timestamp_ms: record.timestamp_ms,
                        };
                        out.records.push(FetchedRecord { offset: o, record });
                        out.next_offset = o + 1;
                    }
                }
                i = j;
            }
            if entries.len() < scan_max {
                break;
            }
            from = offset_key(last.base_offset + 1).to_vec();
        }
        Ok(())
    }
}
