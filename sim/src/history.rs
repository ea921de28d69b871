//! What the clients did and saw: the history the checker judges.
//!
//! Produce operations are recorded Jepsen-style: invoked, then `ok` with the acknowledged offset,
//! `fail` when the record was certainly not written, or `unknown` when the client gave up without
//! knowing (a timeout: the record may or may not be in the log). Consumers record every fetch;
//! consumer-group members record what they delivered, their acknowledged commits and the offsets
//! they started from when they took a partition over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use serde::Serialize;

/// A partition, by topic name and index.
pub type PartitionKey = (String, u32);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Pending,
    Ok { offset: u64 },
    Fail { error: String },
    Unknown { error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ProduceOp {
    pub client: String,
    pub topic: String,
    pub partition: u32,
    /// Unique across the run; never sent twice by the workload.
    pub payload: String,
    pub invoke_ms: u64,
    pub complete_ms: Option<u64>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchObservation {
    pub consumer: String,
    pub topic: String,
    pub partition: u32,
    /// The replica that answered.
    pub node: u64,
    pub requested: u64,
    pub at_ms: u64,
    pub records: Vec<(u64, String)>,
}

/// A record a consumer-group member delivered to its application.
#[derive(Debug, Clone, Serialize)]
pub struct GroupDelivery {
    pub member: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub value: String,
    pub at_ms: u64,
}

/// A group event: an acknowledged offset commit, or a member taking a partition over at the
/// start offset it read (linearizably) from the group's commits.
#[derive(Debug, Clone, Serialize)]
pub enum GroupEvent {
    Committed { member: String, partition: PartitionKey, offset: u64, invoke_ms: u64, complete_ms: u64 },
    TookOver { member: String, partition: PartitionKey, start: u64, invoke_ms: u64, complete_ms: u64 },
}

#[derive(Debug, Default)]
pub struct HistoryData {
    pub produces: Vec<ProduceOp>,
    pub fetches: Vec<FetchObservation>,
    pub deliveries: Vec<GroupDelivery>,
    pub group_events: Vec<GroupEvent>,
}

/// Shared by every client host and the driver.
#[derive(Clone, Default)]
pub struct History {
    inner: Arc<Mutex<HistoryData>>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryData> {
        self.inner.lock().expect("history lock poisoned")
    }

    /// Records an invocation; returns its index.
    pub fn invoke(&self, client: &str, topic: &str, partition: u32, payload: String, now_ms: u64) -> usize {
        let mut h = self.lock();
        h.produces.push(ProduceOp {
            client: client.to_owned(),
            topic: topic.to_owned(),
            partition,
            payload,
            invoke_ms: now_ms,
            complete_ms: None,
            outcome: Outcome::Pending,
        });
        h.produces.len() - 1
    }

    pub fn complete(&self, op: usize, outcome: Outcome, now_ms: u64) {
        let mut h = self.lock();
        let p = &mut h.produces[op];
        assert_eq!(p.outcome, Outcome::Pending, "an operation completes once");
        p.outcome = outcome;
        p.complete_ms = Some(now_ms);
    }

    pub fn fetched(&self, obs: FetchObservation) {
        self.lock().fetches.push(obs);
    }

    pub fn delivered(&self, d: GroupDelivery) {
        self.lock().deliveries.push(d);
    }

    pub fn group_event(&self, e: GroupEvent) {
        self.lock().group_events.push(e);
    }

    pub fn snapshot(&self) -> (Vec<ProduceOp>, Vec<FetchObservation>) {
        let h = self.lock();
        (h.produces.clone(), h.fetches.clone())
    }

    pub fn group_snapshot(&self) -> (Vec<GroupDelivery>, Vec<GroupEvent>) {
        let h = self.lock();
        (h.deliveries.clone(), h.group_events.clone())
    }

    pub fn acked(&self) -> usize {
        self.lock().produces.iter().filter(|p| matches!(p.outcome, Outcome::Ok { .. })).count()
    }

    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let h = self.lock();
        let mut c = BTreeMap::new();
        for p in &h.produces {
            let k = match p.outcome {
                Outcome::Pending => "pending",
                Outcome::Ok { .. } => "ok",
                Outcome::Fail { .. } => "fail",
                Outcome::Unknown { .. } => "unknown",
            };
            *c.entry(k).or_default() += 1;
        }
        c.insert("fetches", h.fetches.len());
        c.insert("group_deliveries", h.deliveries.len());
        c
    }
}
