//! The simulated network seen through Eddy's seams: channels whose TCP streams are turmoil's,
//! and listeners that accept turmoil connections. Every host runs the real gRPC stack on top.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use eddy_node::env::BoxedIo;
use eddy_node::env::Incoming;
use eddy_raft::transport::Connector;
use eddy_raft::transport::Dial;
use eddy_raft::transport::Stream;
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// An endpoint with the node's timeouts and keep-alives, without adaptive flow control (its
/// bandwidth estimate reads the real clock, which would break determinism).
fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(with_settings(Endpoint::from_shared(format!("http://{addr}"))?))
}

fn with_settings(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(eddy_raft::transport::CONNECT_TIMEOUT)
        .http2_keep_alive_interval(eddy_raft::transport::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(eddy_raft::transport::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_connection_window_size(eddy_raft::transport::CONNECTION_WINDOW)
        .initial_stream_window_size(eddy_raft::transport::STREAM_WINDOW)
        .http2_max_local_error_reset_streams(None)
}

/// Pause between connection attempts after failures, doubling up to this. It must stay well
/// below the connect timeout, which covers the pause too.
const CONNECT_GAP_MAX: Duration = Duration::from_millis(400);
const CONNECT_GAP_MIN: Duration = Duration::from_millis(50);

/// When the last attempt started and how long to wait before the next one.
#[derive(Default)]
struct ConnectPacing {
    last: Option<tokio::time::Instant>,
    gap: Duration,
}

/// Opens turmoil TCP connections to `addr`.
///
/// Connection attempts are paced: after a failure, the next attempt waits (50 ms doubling to
/// 400 ms). turmoil 0.7 never frees the local port of a
/// connection attempt that fails or is abandoned, and tonic reconnects without pause, so an
/// unpaced channel to a dead peer would exhaust the host's ports in a long run.
fn turmoil_dial(addr: &str) -> Dial {
    let target = addr.to_owned();
    let pacing = Arc::new(Mutex::new(ConnectPacing::default()));
    Arc::new(move || {
        let target = target.clone();
        let pacing = pacing.clone();
        Box::pin(async move {
            // Wait out the pause (rather than failing at once: a caller that retries at once
            // would spin without simulated time passing).
            let start = {
                let mut p = pacing.lock().expect("pacing lock poisoned");
                let now = tokio::time::Instant::now();
                let start = p.last.map_or(now, |last| (last + p.gap).max(now));
                p.last = Some(start);
                // Until this attempt succeeds, the next one waits (also if this one is abandoned).
                p.gap = (p.gap * 2).clamp(CONNECT_GAP_MIN, CONNECT_GAP_MAX);
                start
            };
            tokio::time::sleep_until(start).await;
            let stream = turmoil::net::TcpStream::connect(target.as_str()).await?;
            pacing.lock().expect("pacing lock poisoned").gap = Duration::ZERO;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    })
}

/// A lazily connecting channel to `endpoint` over turmoil TCP; with TLS when `endpoint` has a
/// TLS configuration (tonic layers it on the streams).
fn turmoil_channel(endpoint: Endpoint, addr: &str) -> Channel {
    let dial = turmoil_dial(addr);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let dial = dial.clone();
        async move { dial().await.map(TokioIo::new) }
    }))
}

/// Node-to-node channels (the node layers TLS on [`Connector::dial`] when it has TLS).
pub struct SimConnector;

impl Connector for SimConnector {
    fn channel(&self, addr: &str) -> Channel {
        match endpoint(addr) {
            Ok(ep) => turmoil_channel(ep, addr),
            Err(_) => Endpoint::from_static("http://invalid:1").connect_lazy(),
        }
    }

    fn dial(&self, addr: &str) -> Dial {
        turmoil_dial(addr)
    }
}

/// Client-to-node channels, for the `ops` clients of the workload and the driver: TLS with
/// the cluster CA (and a client certificate, for the driver's superuser) when the cluster has it.
#[derive(Default)]
pub struct SimConnect {
    pub tls: Option<eddy_ops::TlsOptions>,
}

impl eddy_ops::Connect for SimConnect {
    fn channel(&self, addr: &str) -> eddy_ops::error::Result<Channel> {
        let invalid = |e: tonic::transport::Error| eddy_ops::ClientError::Invalid(format!("{addr}: {e}"));
        let ep = match &self.tls {
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|ep| ep.tls_config(tls.tonic()))
                .map_err(invalid)?,
            None => Endpoint::from_shared(format!("http://{addr}")).map_err(invalid)?,
        };
        Ok(turmoil_channel(with_settings(ep), addr))
    }
}

/// Accepts connections on a turmoil listener.
pub async fn listen(port: u16) -> io::Result<Incoming> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    Ok(Box::pin(futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| BoxedIo::new(s));
        Some((r, l))
    })))
}

/// A turmoil UDP socket, for node liveness probes.
pub struct SimDatagrams(turmoil::net::UdpSocket);

impl SimDatagrams {
    pub async fn bind(port: u16) -> io::Result<Self> {
        Ok(Self(turmoil::net::UdpSocket::bind(("0.0.0.0", port)).await?))
    }
}

impl eddy_raft::transport::Datagrams for SimDatagrams {
    fn resolve<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<SocketAddr>> {
        Box::pin(async move {
            let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad address {addr}"));
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            Ok(SocketAddr::new(turmoil::lookup(host), port))
        })
    }

    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.0.send_to(buf, to).await.map(drop) })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(self.0.recv_from(buf))
    }
}

/// A pause that also works outside a host (where turmoil has no clock): for the workload.
pub async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}
