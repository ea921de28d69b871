//! TLS for every listener and for the channels between nodes: certificates from PEM files,
//! rustls configurations with ring as the one crypto provider, what a peer's certificate says
//! about who it is ([`CertIdentity`]), and [`guard`], which every listener's connections pass
//! through (connection cap, TLS handshake with a deadline, plaintext refused with a reason).
//!
//! Identities: a node certificate carries the URI SAN `urn:eddy:node:<id>` (whatever its common
//! name); any other certificate names a user by its subject's common name. Both are signed by
//! the cluster CA (`eddyctl cert create-ca | create-node | create-client`).

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eddy_raft::NodeId;
use eddy_raft::transport::Dial;
use eddy_raft::transport::Stream;
use eddy_raft::vfs::Vfs;
use futures::StreamExt;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tracing::debug;
use tracing::info;

use crate::env::BoxedIo;
use crate::env::Clock;
use crate::env::Incoming;
use crate::env::PeerInfo;

/// The URI SAN prefix of a node certificate.
pub const NODE_URI_PREFIX: &str = "urn:eddy:node:";
/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The `[tls]` table of the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate (PEM; its chain may follow), signed by `ca`, naming this node
    /// (`eddyctl cert create-node ID`).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The cluster CA (PEM): peers' and clients' certificates must be signed by it.
    pub ca: PathBuf,
    /// Clients of the client and Kafka listeners must present a certificate signed by `ca`.
    /// Between nodes a certificate is always required.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Serve `/metrics` and `/health` over HTTPS too.
    #[serde(default)]
    pub http: bool,
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    Node(NodeId),
    User(String),
}

/// Reads what a certificate says about its holder; `None` when it names nobody.
pub fn identity_of(der: &[u8]) -> Option<CertIdentity> {
    use x509_parser::prelude::FromDer;
    use x509_parser::prelude::GeneralName;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
            {
                return id.parse().ok().map(CertIdentity::Node);
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| CertIdentity::User(cn.to_owned()))
}

/// Installs ring as the process's crypto provider (once; later calls do nothing). Every
/// configuration below also names the provider explicitly, so a second provider linked in by
/// some dependency can never make rustls guess.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The most bytes a certificate or key file may have.
const PEM_FILE_MAX: u64 = 1 << 20;

fn read_pem(vfs: &dyn Vfs, path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    vfs.read_small(path, PEM_FILE_MAX).with_context(|| format!("{what}: read {}", path.display()))
}

fn read_certs(vfs: &dyn Vfs, path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(vfs, path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(CertificateDer::into_owned))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: {} is not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{what}: {} holds no certificate", path.display());
    Ok(certs)
}

/// rustls's clock: the node's (simulated time in the simulator), for certificate validity.
#[derive(Clone)]
struct NodeTime(Arc<dyn Clock>);

impl std::fmt::Debug for NodeTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTime")
    }
}

impl rustls::time_provider::TimeProvider for NodeTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        let ms = u64::try_from(self.0.now_ms()).ok()?;
        Some(rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_millis(ms)))
    }
}

/// Loaded certificates and keys, from which every TLS configuration of a node is built.
#[derive(Clone)]
pub struct TlsMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    pub identity: Option<CertIdentity>,
    pub require_client_cert: bool,
    pub http: bool,
    time: Arc<NodeTime>,
}

impl TlsMaterial {
    /// Reads the files `c` names from `vfs`; certificates are checked against `clock`.
    pub fn load(c: &TlsConfig, vfs: &dyn Vfs, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let chain = read_certs(vfs, &c.cert, "tls.cert")?;
        let key = PrivateKeyDer::from_pem_slice(&read_pem(vfs, &c.key, "tls.key")?)
            .with_context(|| format!("tls.key: {} is not a PEM private key file", c.key.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(vfs, &c.ca, "tls.ca")? {
            roots
                .add(ca)
                .with_context(|| format!("tls.ca: {} is not a usable CA certificate", c.ca.display()))?;
        }
        let identity = identity_of(&chain[0]);
        let m = Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            identity,
            require_client_cert: c.require_client_cert,
            http: c.http,
            time: Arc::new(NodeTime(clock)),
        };
        // Fails now, with the reason, rather than at the first connection.
        m.server_config(false, &[]).context("tls.cert and tls.key do not form a usable pair")?;
        Ok(m)
    }

    /// A server configuration; client certificates are verified against the CA, and required
    /// when `require_client_cert`. No session resumption: connections here are long-lived, and
    /// a handshake that never depends on a ticket's age on two clocks behaves the same in every
    /// simulator run.
    pub fn server_config(
        &self,
        require_client_cert: bool,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<ServerConfig>> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = if require_client_cert { verifier } else { verifier.allow_unauthenticated() };
        let mut config = ServerConfig::builder_with_details(provider(), self.time.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("certificate and key")?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The configuration of this node's channels to its peers: it presents its own certificate
    /// and trusts the cluster CA only.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut config = rustls::ClientConfig::builder_with_details(provider(), self.time.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("client certificate and key")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// What a listener does with each connection before its protocol sees it.
#[derive(Clone)]
pub struct Guard {
    /// The listener's name, for logs and metrics.
    pub listener: &'static str,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// What a plaintext client of a TLS listener is told before its connection is closed:
    /// an HTTP/2 answer with a gRPC status (for gRPC listeners), or nothing.
    pub plaintext_answer: PlaintextAnswer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaintextAnswer {
    Grpc,
    Close,
}

/// Runs `incoming` through `guard`: each connection gets a permit (or is closed at once), then,
/// with TLS, its handshake runs in a task of its own within the deadline, so a client that never
/// speaks holds up no one. The returned stream ends when `incoming` does.
pub fn guard(mut incoming: Incoming, guard: Guard) -> Incoming {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<BoxedIo>>(64);
    let permits = Arc::new(Semaphore::new(guard.max_connections));
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                // Both arms only wait; the listener closes with the server.
                () = tx.closed() => return,
                n = incoming.next() => n,
            };
            let Some(accepted) = next else { return };
            let mut io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                guard.metrics.connection_refused(guard.listener, "connection_limit");
                info!(
                    listener = guard.listener,
                    remote = ?io.info.remote,
                    limit = guard.max_connections,
                    "refused a connection: the listener's connection limit is reached"
                );
                continue;
            };
            io.permit = Some(Arc::new(permit));
            let Some(tls) = guard.tls.clone() else {
                if tx.send(Ok(io)).await.is_err() {
                    return;
                }
                continue;
            };
            let (tx, guard) = (tx.clone(), guard.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(guard.handshake_timeout, handshake(io, tls, &guard)).await {
                    Ok(Some(io)) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(None) => {}
                    Err(_) => {
                        guard.metrics.auth_failure(guard.listener, "handshake_timeout");
                        debug!(
                            listener = guard.listener,
                            "closed a connection whose TLS handshake took too long"
                        );
                    }
                }
            });
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn handshake(io: BoxedIo, tls: tokio_rustls::TlsAcceptor, guard: &Guard) -> Option<BoxedIo> {
    let (info, permit) = (io.info.clone(), io.permit.clone());
    let mut first = [0u8; 1];
    let mut io = io;
    match peek(&mut io, &mut first).await {
        Ok(true) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(true) => {
            guard.metrics.auth_failure(guard.listener, "plaintext");
            info!(listener = guard.listener, remote = ?info.remote, "refused a plaintext connection: this listener requires TLS");
            if guard.plaintext_answer == PlaintextAnswer::Grpc {
                answer_plaintext(io, first[0]).await;
            }
            return None;
        }
        _ => return None,
    }
    let prefixed = Prefixed { first: Some(first[0]), io };
    match tls.accept(prefixed).await {
        Ok(stream) => {
            let (_, conn) = stream.get_ref();
            let identity = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| identity_of(c));
            let info = PeerInfo { tls: true, cert: identity, ..info };
            let mut io = BoxedIo::with_info(stream, info);
            io.permit = permit;
            Some(io)
        }
        Err(e) => {
            guard.metrics.auth_failure(guard.listener, "handshake");
            info!(listener = guard.listener, remote = ?info.remote, "TLS handshake failed: {e}");
            None
        }
    }
}

/// Reads one byte (false at end of stream).
async fn peek(io: &mut BoxedIo, buf: &mut [u8; 1]) -> io::Result<bool> {
    use tokio::io::AsyncReadExt;
    Ok(io.read(buf).await? == 1)
}

/// Answers a plaintext gRPC client of a TLS listener: every call it makes gets `UNAVAILABLE`
/// saying that the listener needs TLS, so the operator reads the cause instead of a reset.
async fn answer_plaintext(io: BoxedIo, first: u8) {
    let io = hyper_util::rt::TokioIo::new(Prefixed { first: Some(first), io });
    let service = hyper::service::service_fn(|_req| async {
        let status = tonic::Status::from(crate::error::BrokerError::Unauthenticated(
            "this node's listener requires TLS: connect with https:// and the cluster's CA (eddyctl --ca FILE, env EDDY_CA)"
                .into(),
        ));
        Ok::<_, std::convert::Infallible>(status.into_http::<tonic::body::Body>())
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .max_concurrent_streams(4)
        .serve_connection(io, service);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// A stream with its first byte read already, given back on the first read.
struct Prefixed {
    first: Option<u8>,
    io: BoxedIo,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if let Some(b) = self.first.take() {
            buf.put_slice(&[b]);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Channels to peers over TLS on the streams `inner` dials (real TCP, or the simulator's), each
/// checking that the peer's certificate names the node it was dialled as (a node that presents
/// another node's certificate is refused).
pub struct TlsConnector {
    pub inner: Arc<dyn eddy_raft::transport::Connector>,
    pub config: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    /// Opens TLS connections to `addr`, over the streams the inner connector dials; with `node`,
    /// refuses a peer whose certificate names another node.
    fn tls_dial(&self, node: Option<NodeId>, addr: &str) -> Dial {
        let (config, target, dial) = (self.config.clone(), addr.to_owned(), self.inner.dial(addr));
        Arc::new(move || {
            let (config, target, dial) = (config.clone(), target.clone(), dial.clone());
            Box::pin(async move {
                let stream = dial().await?;
                let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{target}: {e}")))?;
                let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, stream).await?;
                if let Some(expected) = node {
                    let (_, conn) = tls.get_ref();
                    let found = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| identity_of(c));
                    if found != Some(CertIdentity::Node(expected)) {
                        let _ = tls.shutdown().await;
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!(
                                "{target} presented a certificate for {found:?}, not for node {expected}"
                            ),
                        ));
                    }
                }
                Ok(Box::new(tls) as Box<dyn Stream>)
            })
        })
    }
}

impl eddy_raft::transport::Connector for TlsConnector {
    fn channel(&self, addr: &str) -> Channel {
        self.channel_to(None, addr)
    }

    fn channel_to(&self, node: Option<NodeId>, addr: &str) -> Channel {
        let Ok(endpoint) = eddy_raft::transport::endpoint(addr) else {
            return tonic::transport::Endpoint::from_static("http://invalid.invalid:1").connect_lazy();
        };
        let dial = self.tls_dial(node, addr);
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let dial = dial.clone();
            async move { dial().await.map(hyper_util::rt::TokioIo::new) }
        }))
    }

    fn dial(&self, addr: &str) -> Dial {
        self.tls_dial(None, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_from_certificates() {
        let ca = eddy_ops::pki::Ca::new("test").expect("CA");
        let node = ca.node(7, &["127.0.0.1".into()]).expect("node cert");
        let client = ca.client("alice").expect("client cert");
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");
        assert_eq!(identity_of(&der(&node.cert_pem)), Some(CertIdentity::Node(7)));
        assert_eq!(identity_of(&der(&client.cert_pem)), Some(CertIdentity::User("alice".into())));
        assert_eq!(identity_of(b"not a certificate"), None);
    }
}
