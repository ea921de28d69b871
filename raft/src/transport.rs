//! The connection seam: how a node reaches its peers. [`Connector`] turns an address into a
//! gRPC channel; production uses [`TcpConnector`], the simulator a connector over turmoil's TCP.
//! [`Peers`] keeps one channel per peer node, shared by every Raft group, so all groups'
//! traffic to a peer is multiplexed on one HTTP/2 connection.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::calls::CallLink;
use crate::types::NodeId;

/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive: a connection whose PING is not answered in time is closed, so a silently
/// dead connection (a lost segment on a simulated network) is noticed and a new one made. Dead
/// and frozen peers are found by the liveness probes; this catches a dead connection to a live
/// peer, on which a replication stream would otherwise wait for good. (Raised to 10 s for a
/// while, it let simulator seed 21 leave a follower behind for 20 s; connections dropped under
/// load were h2's frame and reset limits, see `CONNECTION_WINDOW`.)
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes lazily connecting gRPC channels.
pub trait Connector: Send + Sync + 'static {
    /// A channel to `addr` (`host:port`). It connects on first use and reconnects after a
    /// failure; every call on it must still carry its own deadline.
    fn channel(&self, addr: &str) -> Channel;

    /// A channel to node `node` (when known) at `addr`: a connector that can tell nodes apart
    /// (TLS, by their certificates) refuses a peer that is not the node it dialled.
    fn channel_to(&self, node: Option<NodeId>, addr: &str) -> Channel {
        let _ = node;
        self.channel(addr)
    }

    /// How this connector opens a byte stream to `addr`, for a connector layered on top of it
    /// (TLS): each call of the returned function is one connection attempt.
    fn dial(&self, addr: &str) -> Dial;
}

/// A byte stream to a peer, as a [`Connector`] dials it.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Opens one connection to a fixed address each time it is called (see [`Connector::dial`]).
pub type Dial = Arc<dyn Fn() -> BoxFuture<'static, io::Result<Box<dyn Stream>>> + Send + Sync>;

/// A datagram socket, for node liveness probes: a real UDP socket, or the simulator's.
pub trait Datagrams: Send + Sync + 'static {
    /// The address of `addr` (`host:port`).
    fn resolve<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<SocketAddr>>;
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<()>>;
    /// The next datagram. Cancel-safe: dropping the future loses no datagram.
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>>;
}

/// A real UDP socket.
impl Datagrams for tokio::net::UdpSocket {
    fn resolve<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<SocketAddr>> {
        Box::pin(async move {
            match addr.parse() {
                Ok(a) => Ok(a),
                Err(_) => tokio::net::lookup_host(addr)
                    .await?
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr} has no address"))),
            }
        })
    }

    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { tokio::net::UdpSocket::send_to(self, buf, to).await.map(drop) })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(tokio::net::UdpSocket::recv_from(self, buf))
    }
}

/// HTTP/2 flow-control windows of Eddy's channels (receiving side of the caller). h2 closes a
/// connection (GOAWAY `ENHANCE_YOUR_CALM`, "too_many_data_frames") once the small DATA frames
/// it has buffered for the application exceed half the connection window, 25,600 bytes by
/// default: about a hundred responses. One channel to a peer carries the replication streams
/// of every group this node leads there, and while this node is busy their small responses
/// queue up: at 3,000 partitions under produce load the budget ran out every few seconds, and
/// each time a thousand groups lost their streams at once. (Adaptive flow control would
/// replace these windows with its estimate, and shrink the budget with it.)
pub const CONNECTION_WINDOW: u32 = 64 << 20;
pub const STREAM_WINDOW: u32 = 2 << 20;

/// The standard endpoint settings for Eddy's channels, for any connector.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        // h2 also closes a connection after 1,024 streams it reset itself because of an error,
        // over the connection's whole life; between a cluster's own nodes, thousands of groups
        // reach that within minutes of a failover, and each time every group on the
        // connection loses its streams. The limit guards against untrusted peers.
        .http2_max_local_error_reset_streams(None))
}

/// Real TCP.
#[derive(Debug, Default, Clone)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn channel(&self, addr: &str) -> Channel {
        match endpoint(addr) {
            Ok(ep) => ep.connect_lazy(),
            // An unparsable address yields a channel whose every call fails with that error.
            Err(_) => Endpoint::from_static("http://invalid.invalid:1").connect_lazy(),
        }
    }

    fn dial(&self, addr: &str) -> Dial {
        let target = addr.to_owned();
        Arc::new(move || {
            let target = target.clone();
            Box::pin(async move {
                let stream = tokio::net::TcpStream::connect(&target).await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream) as Box<dyn Stream>)
            })
        })
    }
}

/// One channel per peer, keyed by node id and address, and one [`CallLink`] on it.
pub struct Peers {
    connector: Arc<dyn Connector>,
    channels: Mutex<BTreeMap<NodeId, (String, Channel)>>,
    links: Mutex<BTreeMap<NodeId, (String, Arc<CallLink>)>>,
}

impl Peers {
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self { connector, channels: Mutex::new(BTreeMap::new()), links: Mutex::new(BTreeMap::new()) }
    }

    /// The stream that carries every group's short calls to `node` at `addr`; a new one if the
    /// address changed.
    pub fn call_link(&self, node: NodeId, addr: &str) -> Arc<CallLink> {
        let mut links = self.links.lock().expect("peers lock poisoned");
        if let Some((a, link)) = links.get(&node)
            && a == addr
        {
            return link.clone();
        }
        let link = Arc::new(CallLink::new(node));
        links.insert(node, (addr.to_owned(), link.clone()));
        link
    }

    /// The channel to `node` at `addr`; a new one if the address changed.
    pub fn channel(&self, node: NodeId, addr: &str) -> Channel {
        let mut channels = self.channels.lock().expect("peers lock poisoned");
        if let Some((a, ch)) = channels.get(&node)
            && a == addr
        {
            return ch.clone();
        }
        let ch = self.connector.channel_to(Some(node), addr);
        channels.insert(node, (addr.to_owned(), ch.clone()));
        ch
    }

    /// Makes the next call to `node` open a new connection; calls under way keep theirs.
    pub fn reconnect(&self, node: NodeId) {
        self.channels.lock().expect("peers lock poisoned").remove(&node);
        self.links.lock().expect("peers lock poisoned").remove(&node);
    }

    /// A channel to an address that is not (yet) a known node, e.g. a broker's client port.
    pub fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }
}
