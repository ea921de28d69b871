//! What a node takes from the outside: files, state store, clock, connections and randomness.
//! Production passes the real ones (see `main.rs`); the simulator passes simulated ones, and the
//! node code cannot tell the difference.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;

use eddy_raft::kv::StateStore;
use eddy_raft::transport::Connector;
use eddy_raft::vfs::Vfs;
use futures::stream::BoxStream;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

/// Wall-clock time, for record timestamps only; durations always come from `tokio::time`.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one place production reads the wall clock.
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A wall clock that never runs ahead of the time that actually passed since it was made: it
/// reads the smaller of the wall clock and the wall clock's reading at creation plus the
/// monotonic time elapsed since. Time-based retention reads it, so that a wall clock that
/// jumps forward (a bad NTP step, an operator's typo) cannot purge events younger than
/// `retention.ms`; a clock that jumps backward only keeps events longer. Kafka reads the wall
/// clock and deletes on a forward jump. A node started with its clock already wrong is not
/// protected: nothing local can tell.
pub struct SteadyClock {
    wall: Arc<dyn Clock>,
    wall_at_start: i64,
    started: tokio::time::Instant,
}

impl SteadyClock {
    pub fn new(wall: Arc<dyn Clock>) -> Self {
        Self { wall_at_start: wall.now_ms(), wall, started: tokio::time::Instant::now() }
    }
}

impl Clock for SteadyClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.wall.now_ms().min(self.wall_at_start.saturating_add(elapsed))
    }
}

/// The seams of one node.
#[derive(Clone)]
pub struct NodeEnv {
    pub vfs: Arc<dyn Vfs>,
    pub state_store: Arc<dyn StateStore>,
    pub clock: Arc<dyn Clock>,
    pub connector: Arc<dyn Connector>,
    /// Seeds openraft's randomness (election timeouts) on this node.
    pub seed: u64,
    /// Extra time each partition replica takes to open. Zero outside the simulator: there, the
    /// CPU a real node spends opening its replicas takes no simulated time, and this delay
    /// restores the window in which peers already see the node up but its replicas are not
    /// serving yet.
    pub replica_open_delay: std::time::Duration,
    /// Bugs planted by the simulator; all off unless `eddy-sim --inject-bug` says otherwise.
    #[cfg(feature = "planted-bugs")]
    pub bugs: PlantedBugs,
}

/// Deliberate bugs the simulator can plant in the node to prove its checker finds them.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// A follower serves records past its commit point.
    pub follower_reads_uncommitted: bool,
    /// A bearer token (or SASL/PLAIN password) is accepted on its user name alone: its secret
    /// is not checked.
    pub tokens_unchecked: bool,
    /// A log append that meets a full disk is reported done although nothing was written.
    pub disk_full_ignored: bool,
    /// A failed `fdatasync` of the log is taken for a good one.
    pub fsync_failure_ignored: bool,
    /// A pristine replica among a partition's initial replicas founds its group, even after a
    /// move took the partition away and a later one brought it back (simulator seed 88).
    pub returning_replica_refounds: bool,
    /// Log frames' checksums are not checked: a byte the disk corrupted is served as data.
    pub corrupt_record_served: bool,
    /// A node refuses for good the Raft messages of a node its metadata does not list yet (no
    /// vouching by the members it knows): a node behind a join never catches up.
    pub unlisted_node_refused: bool,
    /// A joining node takes an error that is not the cluster's refusal (an unreachable node, a
    /// leader change) for a refusal, and stops trying to join.
    pub join_gives_up: bool,
    /// A partition that was moving when a decommission of one of its nodes began is never
    /// planned away once that move completes: the decommission never finishes.
    pub decommission_forgets_moving: bool,
    /// Time-based retention reads the wall clock as it is, so a clock that jumps forward purges
    /// events younger than `retention.ms` (see [`SteadyClock`]).
    pub retention_trusts_wall_clock: bool,
    /// Time-based retention reads this node's [`SteadyClock`] alone, without checking it
    /// against its peers' clocks: a process started on a clock already ahead purges.
    pub retention_ignores_peers: bool,
    /// A node answers clients' questions about the cluster (placement, topics, moves) from its
    /// own view however long ago it was confirmed current: a removed node that still runs sends
    /// clients to replicas that moved away.
    pub stale_metadata_served: bool,
    /// The state store's checksums are not checked: a byte the disk corrupted in a partition's
    /// stored state (an offset-index entry, the partition's scalar state) is read back as state.
    pub state_corrupt_served: bool,
}

/// Any byte stream a server can accept connections on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What a server knows about the other end of a connection: its address when there is one,
/// and whether it spoke TLS with a certificate, and whose. Handed to each request (tonic's
/// connect info) and read by authentication (`crate::security`).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote: Option<std::net::SocketAddr>,
    pub tls: bool,
    pub cert: Option<crate::security::tls::CertIdentity>,
    /// Shared by every request on the connection; lets a request's layer close it.
    pub conn: Arc<ConnGuard>,
}

/// Requests a client abandoned on one connection before they were answered, per second: a
/// client that opens streams and resets them at once (the HTTP/2 "rapid reset" flood,
/// CVE-2023-44487) makes the server start work it then throws away, and is cut off.
#[derive(Debug, Default)]
pub struct ConnGuard {
    /// (start of the current second, requests abandoned in it).
    abandoned: std::sync::Mutex<Option<(tokio::time::Instant, u32)>>,
    killed: std::sync::atomic::AtomicBool,
}

/// Abandoned requests per second past which a connection is closed.
pub const ABANDONED_PER_SECOND_MAX: u32 = 200;

impl ConnGuard {
    /// Counts an abandoned request; true when this closed the connection.
    pub fn abandoned(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut a = self.abandoned.lock().expect("conn guard lock poisoned");
        let (start, n) = match *a {
            Some((start, n)) if now.duration_since(start) < std::time::Duration::from_secs(1) => {
                (start, n + 1)
            }
            _ => (now, 1),
        };
        *a = Some((start, n));
        if n > ABANDONED_PER_SECOND_MAX && !self.killed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        false
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An accepted connection, whatever its transport.
pub struct BoxedIo {
    io: Pin<Box<dyn Io>>,
    pub info: PeerInfo,
    /// The listener's connection slot, held until the connection closes.
    pub permit: Option<std::sync::Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl BoxedIo {
    pub fn new(io: impl Io) -> Self {
        Self::with_info(io, PeerInfo::default())
    }

    pub fn with_info(io: impl Io, info: PeerInfo) -> Self {
        Self { io: Box::pin(io), info, permit: None }
    }
}

impl tonic::transport::server::Connected for BoxedIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for BoxedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.info.conn.is_killed() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut off")));
        }
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.info.conn.is_killed() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut off")));
        }
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

/// Where a node sends and answers node liveness probes (see `eddy_raft::liveness`).
pub enum ProbeSocket {
    /// A real UDP socket, bound to the Raft address. The probes get an OS thread and a runtime
    /// of their own, so that a node whose runtime is busy with thousands of groups still
    /// answers at once: a peer is judged by whether its process runs, not by how loaded it is.
    Thread(std::net::UdpSocket),
    /// Any datagram socket, served by a task on the node's runtime (the simulator's, where
    /// every task runs on one simulated runtime).
    Task(std::sync::Arc<dyn eddy_raft::transport::Datagrams>),
}

/// A stream of accepted connections: a server's listener.
pub type Incoming = BoxStream<'static, io::Result<BoxedIo>>;

/// Accepts connections from a real TCP listener.
pub fn tcp_incoming(listener: tokio::net::TcpListener) -> Incoming {
    Box::pin(futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, remote)| {
            let _ = s.set_nodelay(true);
            BoxedIo::with_info(s, PeerInfo { remote: Some(remote), ..PeerInfo::default() })
        });
        Some((r, l))
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;

    /// A wall clock the test sets.
    struct Manual(AtomicI64);

    impl Clock for Arc<Manual> {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_clock_follows_the_wall_clock_but_never_runs_ahead_of_elapsed_time() {
        let wall = Arc::new(Manual(AtomicI64::new(1_000_000)));
        let steady = SteadyClock::new(Arc::new(wall.clone()));
        tokio::time::advance(Duration::from_secs(10)).await;
        wall.0.store(1_010_000, Ordering::Relaxed);
        assert_eq!(steady.now_ms(), 1_010_000, "a true clock reads as it is");
        // Stepped forward by a day: retention must not see it.
        wall.0.store(1_010_000 + 86_400_000, Ordering::Relaxed);
        assert_eq!(steady.now_ms(), 1_010_000);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(steady.now_ms(), 1_015_000, "time goes on at the monotonic pace");
        // Stepped back by an hour: read as it is (events are kept longer).
        wall.0.store(1_015_000 - 3_600_000, Ordering::Relaxed);
        assert_eq!(steady.now_ms(), 1_015_000 - 3_600_000);
    }
}
