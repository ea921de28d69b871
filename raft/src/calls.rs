//! Many groups' short Raft calls to one peer on one stream (`eddy.v1.Raft/Calls`).
//!
//! Votes, pre-votes and leadership transfers were each a unary gRPC call: an HTTP/2 stream with
//! its headers, a task on each side and a deadline header. After a node dies, each survivor
//! runs hundreds of elections at once, and those streams were much of the CPU the failover
//! spends. A [`CallLink`] keeps one `Calls` stream per peer instead (opened on first use, kept
//! while it works, no timers of its own): a call is queued with an id, the stream's writer
//! sends every queued call in one frame, and the reader hands each result to its caller. This
//! is the batching of CockroachDB's per-node `RaftMessageBatch` stream, for the calls that come
//! in bursts; replication keeps its own stream per group and peer (`stream_append`).
//!
//! Every call still has its own deadline: the caller stops waiting after it, and the callee,
//! which receives it with the call, gives up after it too. When the stream fails, every call
//! under way on it fails at once with `UNAVAILABLE` (the caller backs off as for a refused
//! call), and the next call opens a new stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use eddy_proto::v1::RaftCall;
use eddy_proto::v1::RaftCallKind;
use eddy_proto::v1::RaftCalls;
use eddy_proto::v1::RaftRequest;
use eddy_proto::v1::RaftResult;
use eddy_proto::v1::raft_client::RaftClient;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;
use tracing::debug;

use crate::network::RAFT_MESSAGE_BYTES_MAX;
use crate::types::NodeId;

/// Most calls or results in one frame. Calls are small (a vote is under 100 bytes), so a frame
/// stays far below the message limit.
pub const CALLS_PER_FRAME: usize = 512;

/// A call's result: the reply payload, or the error.
type CallResult = Result<Bytes, Status>;

/// The `Calls` stream to one peer; see the module documentation.
pub struct CallLink {
    target: NodeId,
    current: Mutex<Option<Arc<Stream>>>,
    /// The peer answered `UNIMPLEMENTED`: it is of a version without `Calls` (a rolling
    /// upgrade), and its calls go the old way until the link is replaced (`Peers::reconnect`,
    /// when the peer comes back up, as after its upgrade).
    unsupported: AtomicBool,
}

/// One `Calls` stream and the calls waiting for its results.
struct Stream {
    tx: mpsc::UnboundedSender<RaftCall>,
    waiting: Mutex<Waiting>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Waiting {
    /// Set when the stream ended; no call may wait on it afterwards.
    closed: bool,
    calls: BTreeMap<u64, oneshot::Sender<CallResult>>,
}

impl Stream {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl CallLink {
    pub fn new(target: NodeId) -> Self {
        Self { target, current: Mutex::new(None), unsupported: AtomicBool::new(false) }
    }

    /// False once the peer has answered that it has no `Calls`.
    pub fn supported(&self) -> bool {
        !self.unsupported.load(Ordering::Relaxed)
    }

    /// Makes a call on the stream to the peer, opening one on `channel` if none is open, and
    /// waits up to `ttl` for its result.
    pub async fn call(
        self: &Arc<Self>,
        channel: impl FnOnce() -> Channel,
        kind: RaftCallKind,
        request: RaftRequest,
        ttl: Duration,
    ) -> CallResult {
        let (result_tx, result_rx) = oneshot::channel();
        let stream = {
            let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = current.as_ref().filter(|s| !s.waiting().closed).cloned();
            match open {
                Some(s) => s,
                None => {
                    let s = self.open(channel());
                    *current = Some(s.clone());
                    s
                }
            }
        };
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = stream.waiting();
            if w.closed {
                return Err(Status::unavailable(format!("the call stream to node {} ended", self.target)));
            }
            w.calls.insert(id, result_tx);
        }
        let timeout_ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX).max(1);
        let call = RaftCall { id, kind: kind.into(), request: Some(request), timeout_ms };
        if stream.tx.send(call).is_err() {
            stream.waiting().calls.remove(&id);
            return Err(Status::unavailable(format!("the call stream to node {} ended", self.target)));
        }
        match tokio::time::timeout(ttl, result_rx).await {
            Err(_) => {
                stream.waiting().calls.remove(&id);
                Err(Status::deadline_exceeded(format!("no result from node {} within {ttl:?}", self.target)))
            }
            Ok(Err(_)) => Err(Status::unavailable(format!("the call stream to node {} ended", self.target))),
            Ok(Ok(r)) => r,
        }
    }

    /// Opens a new stream on `channel`; its task runs until the stream ends.
    fn open(self: &Arc<Self>, channel: Channel) -> Arc<Stream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = Arc::new(Stream { tx, waiting: Mutex::default(), next_id: AtomicU64::new(0) });
        tokio::spawn(run(self.clone(), stream.clone(), rx, channel));
        stream
    }
}

/// Sends the stream's calls and hands out their results until it ends, then fails every call
/// still waiting on it.
async fn run(
    link: Arc<CallLink>,
    stream: Arc<Stream>,
    rx: mpsc::UnboundedReceiver<RaftCall>,
    channel: Channel,
) {
    let calls = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
        .ready_chunks(CALLS_PER_FRAME)
        .map(|calls| RaftCalls { calls });
    let mut client = RaftClient::new(channel)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    // No deadline of its own: every call waiting on the stream has one, and the channel's
    // connect timeout and keep-alive end a stream to a peer that does not answer.
    let why = match client.calls(tonic::Request::new(calls)).await {
        Err(status) => status,
        Ok(response) => {
            let mut results = response.into_inner();
            loop {
                match results.message().await {
                    Ok(Some(batch)) => {
                        for r in batch.results {
                            let waiter = stream.waiting().calls.remove(&r.id);
                            if let Some(tx) = waiter {
                                let _ = tx.send(into_result(r));
                            }
                        }
                    }
                    Ok(None) => break Status::unavailable("the peer ended the stream"),
                    Err(status) => break status,
                }
            }
        }
    };
    debug!(target = link.target, "call stream ended: {why}");
    if why.code() == Code::Unimplemented {
        link.unsupported.store(true, Ordering::Relaxed);
    }
    let waiting = {
        let mut w = stream.waiting();
        w.closed = true;
        std::mem::take(&mut w.calls)
    };
    for (_, tx) in waiting {
        let _ = tx.send(Err(Status::new(
            why.code(),
            format!("the call stream to node {} ended: {}", link.target, why.message()),
        )));
    }
    let mut current = link.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, &stream)) {
        *current = None;
    }
}

fn into_result(r: RaftResult) -> CallResult {
    if r.code == 0 { Ok(r.payload) } else { Err(Status::new(Code::from(r.code), r.message)) }
}

/// The wire form of a call's result.
pub fn result(id: u64, r: Result<Bytes, Status>) -> RaftResult {
    match r {
        Ok(payload) => RaftResult { id, payload, code: 0, message: String::new() },
        Err(s) => {
            RaftResult { id, payload: Bytes::new(), code: s.code() as i32, message: s.message().to_owned() }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use eddy_proto::RAFT_WIRE_VERSION;
    use eddy_proto::v1::RaftCallKind;
    use eddy_proto::v1::RaftRequest;
    use tokio_util::sync::CancellationToken;
    use tonic::Code;

    use super::CallLink;
    use crate::liveness::Liveness;
    use crate::registry::Registry;
    use crate::service::RaftService;
    use crate::transport::endpoint;

    /// A Raft server on 127.0.0.1 hosting no group; stops when `stop` is cancelled.
    async fn server(stop: CancellationToken) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let service = RaftService::new(
            Arc::new(Registry::default()),
            Liveness::new(2, 1, Arc::new(|| 0)),
            7,
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
                .expect("serve");
        });
        (addr, task)
    }

    fn request(group: u64) -> RaftRequest {
        RaftRequest {
            group_id: group,
            version: RAFT_WIRE_VERSION,
            payload: Default::default(),
            from: 1,
            to: 0,
        }
    }

    #[tokio::test]
    async fn calls_share_a_stream_and_fail_fast_when_it_ends() {
        let stop = CancellationToken::new();
        let (addr, task) = server(stop.clone()).await;
        let channel = endpoint(&addr).expect("endpoint").connect_lazy();
        let link = Arc::new(CallLink::new(2));
        let ttl = Duration::from_secs(5);
        // Many calls at once: each gets its own answer (the server hosts no group).
        let calls = (0..200u64).map(|g| {
            let (link, channel) = (link.clone(), channel.clone());
            async move { link.call(move || channel, RaftCallKind::Vote, request(g), ttl).await }
        });
        for (g, r) in futures::future::join_all(calls).await.into_iter().enumerate() {
            let e = r.expect_err("no group is hosted");
            assert_eq!(e.code(), Code::NotFound, "{e}");
            assert!(e.message().contains(&format!("group {g}")), "answer for the wrong call: {e}");
        }
        let open = link.current.lock().expect("lock").clone().expect("the stream stays open");
        // An unknown kind is refused by name, and the stream survives it.
        let e = link
            .call(|| channel.clone(), RaftCallKind::Unspecified, request(1), ttl)
            .await
            .expect_err("unknown kind");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        let still = link.current.lock().expect("lock").clone().expect("still open");
        assert!(Arc::ptr_eq(&open, &still), "one stream carried every call");

        // The server goes away: the next call fails well before its deadline.
        stop.cancel();
        task.await.expect("server stopped");
        let started = tokio::time::Instant::now();
        let e = link
            .call(|| channel.clone(), RaftCallKind::Vote, request(1), Duration::from_secs(30))
            .await
            .expect_err("server is gone");
        assert_ne!(e.code(), Code::DeadlineExceeded, "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }
}
