//! What the clients did and saw: the history the checker judges.
//!
//! Produce operations are recorded Jepsen-style: invoked, then `ok` with the acknowledged offset,
//! `fail` when the record was certainly not written, or `unknown` when the client gave up without
//! knowing (a timeout: the record may or may not be in the log). Consumers record every fetch.

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

#[derive(Debug, Default)]
pub struct HistoryData {
    pub produces: Vec<ProduceOp>,
    pub fetches: Vec<FetchObservation>,
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

    pub fn snapshot(&self) -> (Vec<ProduceOp>, Vec<FetchObservation>) {
        let h = self.lock();
        (h.produces.clone(), h.fetches.clone())
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
        c
    }
}
