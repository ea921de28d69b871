//! The run's trace: a time-ordered list of what happened (faults, leader changes, client
//! outcomes), normalised so that two runs of the same seed produce identical traces. Its hash
//! is how `--check-determinism` compares runs.

use std::sync::Arc;
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Simulated milliseconds since the start.
    pub at_ms: u64,
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Clone, Default)]
pub struct Trace {
    events: Arc<Mutex<Vec<TraceEvent>>>,
}

impl Trace {
    pub fn push(&self, at_ms: u64, kind: &'static str, detail: impl Into<String>) {
        self.events.lock().expect("trace lock poisoned").push(TraceEvent {
            at_ms,
            kind,
            detail: detail.into(),
        });
    }

    pub fn events(&self) -> Vec<TraceEvent> {
        self.events.lock().expect("trace lock poisoned").clone()
    }

    /// A hash of the whole trace.
    pub fn hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for e in self.events.lock().expect("trace lock poisoned").iter() {
            h.update(&e.at_ms.to_le_bytes());
            h.update(e.kind.as_bytes());
            h.update(&[0]);
            h.update(e.detail.as_bytes());
            h.update(&[0]);
        }
        h.digest()
    }
}

/// The index of the first event where two traces differ, if they do.
pub fn first_divergence<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    let n = a.len().min(b.len());
    (0..n).find(|&i| a[i] != b[i]).or((a.len() != b.len()).then_some(n))
}
