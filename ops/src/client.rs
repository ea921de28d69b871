//! [`Client`]: a connection to an Eddy cluster. It keeps one channel per broker address and a
//! cache of the cluster's metadata, routes produce requests to partition leaders, and retries
//! what can be retried.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eddy_proto::error_codes;
use eddy_proto::v1 as pb;
use eddy_proto::v1::admin_client::AdminClient;
use eddy_proto::v1::broker_client::BrokerClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::error::ClientError;
use crate::error::Result;
use crate::offsets::OffsetSpec;

/// Largest response the client accepts (fetches are bounded well below this by the server).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// A broker that did not answer in time (or refused the connection) is asked last for this long:
/// a frozen or dead node must not cost every metadata request its whole deadline.
const UNRESPONSIVE_FOR: Duration = Duration::from_secs(10);
/// The least time one broker gets when a cluster-wide request shares its time among several.
const ATTEMPT_MIN: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of each RPC (long polls add their wait).
    pub request_timeout: Duration,
    /// First and last pause between retries (doubling in between).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a produce keeps retrying before it fails.
    pub delivery_timeout: Duration,
    /// Sent as `authorization: Bearer …` with every request.
    pub token: Option<Token>,
    /// TLS for [`Client::connect`]'s channels; plaintext when absent.
    pub tls: Option<TlsOptions>,
}

/// A user's token; its `Debug` shows only the user, so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = eddy_proto::credentials::token_user(&self.0).unwrap_or("?");
        write!(f, "Token({user}.…)")
    }
}

/// TLS settings of a client (PEM contents, not paths).
#[derive(Clone)]
pub struct TlsOptions {
    /// The CA that signed the nodes' certificates.
    pub ca_pem: String,
    /// A client certificate and its key, to authenticate as the user it names.
    pub identity: Option<(String, String)>,
}

impl TlsOptions {
    /// tonic's TLS settings for an endpoint: trust the CA, present the certificate if any.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => c.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => c,
        }
    }
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Adds the bearer token to each request.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Credentials {
    pub fn new(token: Option<&Token>) -> Result<Self> {
        let header = match token {
            None => None,
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {}", t.0).parse().map_err(|_| {
                        ClientError::Invalid("--token: not a valid token (printable ASCII)".into())
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Self { header })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A channel to a broker that sends the client's credentials.
pub type Chan = tonic::service::interceptor::InterceptedService<Channel, Credentials>;

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            delivery_timeout: Duration::from_secs(30),
            token: None,
            tls: None,
        }
    }
}

/// A hint for the TLS failures whose rustls names are cryptic.
fn tls_hint(e: &ClientError) -> &'static str {
    let m = e.to_string();
    if m.contains("invalid peer certificate") {
        " (the node's certificate is not issued by the CA given with --ca / EDDY_CA, or not for this address)"
    } else if m.contains("CertificateRequired") || m.contains("certificate required") {
        " (this listener requires a client certificate: --cert and --key)"
    } else {
        ""
    }
}

/// Whether a call's outcome came from the broker: anything but a timeout or a connection that
/// could not be made.
fn answered<T, E>(outcome: &std::result::Result<std::result::Result<T, tonic::Status>, E>) -> bool {
    match outcome {
        Ok(Ok(_)) => true,
        // Eddy's own errors carry a code; a transport failure or a timeout does not.
        Ok(Err(status)) => {
            status.metadata().contains_key(eddy_proto::error_keys::CODE)
                || !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                )
        }
        Err(_) => false,
    }
}

/// A doubling pause between retries, within the config's bounds.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(config: &ClientConfig) -> Self {
        Self { next: config.backoff_min, max: config.backoff_max }
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

/// Where to read a partition from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaChoice {
    Leader,
    /// A replica other than the leader when one is reachable, else the leader.
    Follower,
    /// Exactly this node's replica.
    Node(u64),
}

/// The cluster as the client last saw it.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetadata {
    pub nodes: BTreeMap<u64, pb::NodeInfo>,
    pub metadata_leader: Option<u64>,
    pub topics: BTreeMap<String, pb::TopicMetadata>,
    pub limits: pb::Limits,
    /// The node that answered.
    pub answered_by: u64,
}

impl ClusterMetadata {
    pub fn client_addr(&self, node: u64) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.client_addr.as_str())
    }

    /// Where a write to the partition goes: its leader; if the leader's broker is among
    /// `unresponsive` or no leader is known, a replica of the partition that is not (it waits
    /// for the new leader and sends the client there, or leads itself); else the leader anyway,
    /// or the first replica. None if the partition is unknown.
    pub fn route(&self, topic: &str, partition: u32, unresponsive: &[String]) -> Option<&str> {
        let p = self.partition(topic, partition)?;
        let answers = |a: &&str| !unresponsive.iter().any(|u| u == a);
        let leader = p.leader.and_then(|l| self.client_addr(l));
        if let Some(a) = leader.filter(answers) {
            return Some(a);
        }
        let replicas = || p.replicas.iter().filter_map(|r| self.client_addr(*r));
        replicas().find(answers).or(leader).or_else(|| replicas().next())
    }

    pub fn partition(&self, topic: &str, partition: u32) -> Option<&pb::PartitionMetadata> {
        self.topics.get(topic)?.partitions.get(partition as usize)
    }
}

/// Makes gRPC channels to broker addresses. [`TcpConnect`] is the real network; the simulator
/// supplies one over its simulated network.
pub trait Connect: Send + Sync + 'static {
    fn channel(&self, addr: &str) -> Result<Channel>;
}

/// Channels over real TCP, with TLS when configured.
#[derive(Debug, Default, Clone)]
pub struct TcpConnect {
    pub tls: Option<TlsOptions>,
}

impl TcpConnect {
    pub fn new(tls: Option<TlsOptions>) -> Self {
        Self { tls }
    }
}

/// The URL of a broker address (`host:port`, or with `http://` or `https://`), and whether it
/// is TLS. A plaintext `http://` address with TLS settings is refused rather than silently
/// sent in the clear.
pub fn broker_url(addr: &str, tls: bool) -> Result<(String, bool)> {
    if let Some(rest) = addr.strip_prefix("http://") {
        if tls {
            return Err(ClientError::Invalid(format!(
                "--brokers: {addr:?} is a plaintext (http://) address, but TLS options (--ca, --cert, --key) are given; \
                 use https://{rest} or {rest}"
            )));
        }
        return Ok((addr.to_owned(), false));
    }
    if let Some(rest) = addr.strip_prefix("https://") {
        if !tls {
            return Err(ClientError::Invalid(format!(
                "--brokers: {addr:?} is a TLS (https://) address; give the cluster's CA with --ca (env EDDY_CA)"
            )));
        }
        return Ok((format!("https://{rest}"), true));
    }
    Ok((format!("{}://{addr}", if tls { "https" } else { "http" }), tls))
}

impl Connect for TcpConnect {
    fn channel(&self, addr: &str) -> Result<Channel> {
        let (url, tls) = broker_url(addr, self.tls.is_some())?;
        let mut ep = Endpoint::from_shared(url)
            .map_err(|e| ClientError::Invalid(format!("--brokers: {addr:?} is not a valid address: {e}")))?;
        if tls && let Some(t) = &self.tls {
            ep = ep.tls_config(t.tonic()).map_err(|e| ClientError::Invalid(format!("TLS settings: {e}")))?;
        }
        let ep = ep
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            // Fixed, large windows rather than adaptive ones: h2 closes a connection once the
            // small DATA frames it buffered exceed half the window (a producer writing to a
            // thousand partitions gets a thousand small acks at once), and the adaptive estimate
            // starts at 64 KiB.
            .initial_connection_window_size(16 << 20)
            .initial_stream_window_size(2 << 20)
            // h2 closes a connection after 1,024 streams it reset because of an error, over the
            // connection's life (a guard against untrusted servers): a long-running producer's
            // timed-out requests reach that, and every partition's requests on it then fail.
            .http2_max_local_error_reset_streams(None);
        Ok(ep.connect_lazy())
    }
}

struct Inner {
    credentials: Credentials,
    bootstrap: Vec<String>,
    connect: Arc<dyn Connect>,
    config: ClientConfig,
    channels: Mutex<BTreeMap<String, Channel>>,
    metadata: RwLock<Arc<ClusterMetadata>>,
    /// One metadata refresh at a time, and the count of refreshes done: a caller that waited
    /// for another's refresh takes its result instead of asking again, so a thousand partitions
    /// that lose their leader at once cost one metadata request, not a thousand.
    refresh: tokio::sync::Mutex<()>,
    refreshes: AtomicU64,
    /// Brokers that recently did not answer in time, and when.
    unresponsive: Mutex<BTreeMap<String, Instant>>,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the cluster through any of `brokers` (`host:port`), loading its metadata.
    pub async fn connect(brokers: &[String], config: ClientConfig) -> Result<Self> {
        let connect = Arc::new(TcpConnect::new(config.tls.clone()));
        Self::connect_with(brokers, config, connect).await
    }

    /// Like [`Client::connect`], over the network `connect` provides.
    pub async fn connect_with(
        brokers: &[String],
        config: ClientConfig,
        connect: Arc<dyn Connect>,
    ) -> Result<Self> {
        if brokers.is_empty() {
            return Err(ClientError::Invalid("--brokers: at least one broker address is needed".into()));
        }
        let credentials = Credentials::new(config.token.as_ref())?;
        let client = Self {
            inner: Arc::new(Inner {
                credentials,
                bootstrap: brokers.to_vec(),
                connect,
                config,
                channels: Mutex::new(BTreeMap::new()),
                metadata: RwLock::new(Arc::new(ClusterMetadata::default())),
                refresh: tokio::sync::Mutex::new(()),
                refreshes: AtomicU64::new(0),
                unresponsive: Mutex::new(BTreeMap::new()),
            }),
        };
        client.refresh_metadata().await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A gRPC client for the broker at `addr`.
    pub fn broker(&self, addr: &str) -> Result<BrokerClient<Chan>> {
        Ok(BrokerClient::new(self.channel(addr)?)
            .max_decoding_message_size(RESPONSE_BYTES_MAX)
            .max_encoding_message_size(RESPONSE_BYTES_MAX))
    }

    /// The channel to the broker at `addr`, shared by every call to it.
    pub fn channel(&self, addr: &str) -> Result<Chan> {
        let mut channels = self.inner.channels.lock().expect("channel lock poisoned");
        let ch = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let ch = self.inner.connect.channel(addr)?;
                channels.insert(addr.to_owned(), ch.clone());
                ch
            }
        };
        Ok(tonic::service::interceptor::InterceptedService::new(ch, self.inner.credentials.clone()))
    }

    /// The addresses to try for a cluster-wide request: known nodes first, then the bootstrap list.
    fn candidates(&self) -> Vec<String> {
        let md = self.metadata();
        let mut out: Vec<String> = Vec::new();
        if let Some(l) = md.metadata_leader.and_then(|l| md.client_addr(l)) {
            out.push(l.to_owned());
        }
        for n in md.nodes.values() {
            if !out.contains(&n.client_addr) {
                out.push(n.client_addr.clone());
            }
        }
        for b in &self.inner.bootstrap {
            if !out.contains(b) {
                out.push(b.clone());
            }
        }
        // Brokers that recently did not answer go last, in the same order.
        let unresponsive = self.unresponsive();
        out.sort_by_key(|a| unresponsive.contains(a));
        out
    }

    /// Brokers that did not answer in time within the last [`UNRESPONSIVE_FOR`].
    fn unresponsive(&self) -> Vec<String> {
        let now = Instant::now();
        let mut map = self.inner.unresponsive.lock().expect("unresponsive lock poisoned");
        map.retain(|_, at| now.duration_since(*at) < UNRESPONSIVE_FOR);
        map.keys().cloned().collect()
    }

    /// Notes whether the broker at `addr` answered (with anything) or not.
    fn note_answer(&self, addr: &str, answered: bool) {
        let mut map = self.inner.unresponsive.lock().expect("unresponsive lock poisoned");
        if answered {
            map.remove(addr);
        } else {
            map.insert(addr.to_owned(), Instant::now());
        }
    }

    /// Runs `f` against brokers in turn until one answers (with success or a non-retriable
    /// error), backing off between rounds, for at most the request timeout. Brokers that
    /// recently did not answer are asked last (see [`UNRESPONSIVE_FOR`]).
    pub async fn call_any<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(BrokerClient<Chan>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_any_channel(what, |ch| {
            f(BrokerClient::new(ch)
                .max_decoding_message_size(RESPONSE_BYTES_MAX)
                .max_encoding_message_size(RESPONSE_BYTES_MAX))
        })
        .await
    }

    /// Like [`Client::call_any`], for `eddy.v1.Admin`.
    pub async fn admin_any<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(AdminClient<Chan>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_any_channel(what, |ch| f(AdminClient::new(ch))).await
    }

    /// Runs `f` on a channel to each broker in turn, as [`Client::call_any`] does; for services
    /// other than `eddy.v1.Broker`.
    pub async fn call_any_channel<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(Chan) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = self.inner.config.request_timeout;
        self.call_each(what, timeout, true, || self.candidates(), || async {}, |ch, _| f(ch)).await
    }

    /// The retry loop under every call: tries `f` on each address `targets` names, in order,
    /// until one answers with success or an error that retrying cannot fix, backing off between
    /// rounds (running `after_round`, e.g. a metadata reload) until `timeout`. `f` gets the time
    /// left. An out-of-range answer moves on to the next address, since a replica that installed
    /// a snapshot starts later than the others; it is the result only if no address did better.
    async fn call_each<T, F, Fut, R, RFut>(
        &self,
        what: &str,
        timeout: Duration,
        spread: bool,
        targets: impl Fn() -> Vec<String>,
        mut after_round: R,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(Chan, Duration) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
        R: FnMut() -> RFut,
        RFut: std::future::Future<Output = ()>,
    {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(&self.inner.config);
        let mut last = ClientError::Unavailable(format!("{what}: nothing answered"));
        let mut refused = false;
        loop {
            let mut out_of_range = None;
            let mut round = targets();
            let mut i = 0;
            while i < round.len() {
                let addr = round[i].clone();
                i += 1;
                let mut remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(last);
                }
                let untried = (round.len() + 1 - i) as u32;
                if spread && untried > 1 {
                    // A cluster-wide request shares its time among the brokers still to ask,
                    // so that switched-off ones (a connect that never completes) listed first
                    // cannot use all of it: a new client whose bootstrap list starts with
                    // decommissioned nodes still reaches a live one.
                    remaining = (remaining / untried).max(ATTEMPT_MIN).min(remaining);
                }
                let channel = self.channel(&addr)?;
                let answer = tokio::time::timeout(remaining, f(channel, remaining)).await;
                self.note_answer(&addr, answered(&answer));
                match answer {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    Ok(Err(status)) => {
                        let e = ClientError::from_status(&status);
                        if let ClientError::OffsetOutOfRange { .. } = &e {
                            out_of_range = Some(e);
                            continue;
                        }
                        if !e.is_retriable() {
                            return Err(e);
                        }
                        tracing::debug!(%addr, "{what}: {e}; trying the next broker");
                        // The leader the answer names goes next, even if this client's metadata
                        // does not know it yet (a node that joined since it was read).
                        if let ClientError::Server { leader_addr: Some(l), .. } = &e
                            && !round[..i].contains(l)
                        {
                            round.retain(|a| a != l);
                            round.insert(i, l.clone());
                        }
                        last =
                            ClientError::Unavailable(format!("{what}: broker {addr}: {e}{}", tls_hint(&e)));
                        refused = true;
                    }
                    // A broker's own refusal says more than the deadline that cut its next answer.
                    Err(_) if refused => {}
                    Err(_) => {
                        last =
                            ClientError::Unavailable(format!("{what}: broker {addr} did not answer in time"))
                    }
                }
            }
            if let Some(e) = out_of_range {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            backoff.wait().await;
            after_round().await;
        }
    }

    /// [`Client::call_each`] over the replicas of a partition, best first for `choice`.
    async fn call_replicas<T, F, Fut>(
        &self,
        what: &str,
        (topic, partition): (&str, u32),
        choice: ReplicaChoice,
        timeout: Duration,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(BrokerClient<Chan>, Duration) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        if let ReplicaChoice::Node(n) = choice
            && !self.metadata().nodes.contains_key(&n)
        {
            return Err(ClientError::Invalid(format!("--replica: node {n} is not a node of this cluster")));
        }
        let targets = || self.fetch_targets(topic, partition, choice);
        let reload = || async {
            let _ = self.refresh_metadata().await;
        };
        self.call_each(what, timeout, false, targets, reload, |ch, remaining| {
            f(
                BrokerClient::new(ch)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .max_encoding_message_size(RESPONSE_BYTES_MAX),
                remaining,
            )
        })
        .await
    }

    /// A request with the client's deadline.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.inner.config.request_timeout);
        r
    }

    /// The cached metadata.
    pub fn metadata(&self) -> Arc<ClusterMetadata> {
        self.inner.metadata.read().expect("metadata lock poisoned").clone()
    }

    /// Reloads the metadata from the cluster.
    pub async fn refresh_metadata(&self) -> Result<Arc<ClusterMetadata>> {
        let asked = self.inner.refreshes.load(Ordering::Acquire);
        let _one = self.inner.refresh.lock().await;
        if self.inner.refreshes.load(Ordering::Acquire) != asked {
            return Ok(self.metadata());
        }
        let md = self.fetch_metadata().await?;
        self.inner.refreshes.fetch_add(1, Ordering::Release);
        Ok(md)
    }

    async fn fetch_metadata(&self) -> Result<Arc<ClusterMetadata>> {
        let resp = self
            .call_any("metadata", |mut c| {
                let req = self.request(pb::MetadataRequest { topics: vec![] });
                async move { c.metadata(req).await }
            })
            .await?;
        let md = Arc::new(ClusterMetadata {
            nodes: resp.nodes.into_iter().map(|n| (n.id, n)).collect(),
            metadata_leader: resp.metadata_leader,
            topics: resp.topics.into_iter().map(|t| (t.name.clone(), t)).collect(),
            limits: resp.limits.unwrap_or_default(),
            answered_by: resp.node_id,
        });
        *self.inner.metadata.write().expect("metadata lock poisoned") = md.clone();
        Ok(md)
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: BTreeMap<String, String>,
    ) -> Result<pb::TopicMetadata> {
        let req = pb::CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor,
            config: config.into_iter().collect(),
        };
        let resp = self
            .call_any("create topic", |mut c| {
                let r = self.request(req.clone());
                async move { c.create_topic(r).await }
            })
            .await?;
        resp.topic.ok_or_else(|| ClientError::Unavailable("create topic: empty answer".into()))
    }

    pub async fn list_topics(&self) -> Result<Vec<pb::TopicSummary>> {
        let resp = self
            .call_any("list topics", |mut c| {
                let r = self.request(pb::ListTopicsRequest {});
                async move { c.list_topics(r).await }
            })
            .await?;
        Ok(resp.topics)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicMetadata> {
        let resp = self
            .call_any("describe topic", |mut c| {
                let r = self.request(pb::DescribeTopicRequest { name: name.to_owned() });
                async move { c.describe_topic(r).await }
            })
            .await?;
        resp.topic.ok_or_else(|| ClientError::Unavailable("describe topic: empty answer".into()))
    }

    /// Asks one node about itself, with a short deadline: a liveness probe.
    pub async fn node_status(&self, addr: &str, timeout: Duration) -> Result<pb::NodeStatusResponse> {
        let mut c = self.broker(addr)?;
        let mut r = tonic::Request::new(pb::NodeStatusRequest { recent: false });
        r.set_timeout(timeout);
        match tokio::time::timeout(timeout, c.node_status(r)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::from_status(&s)),
            Err(_) => Err(ClientError::Unavailable(format!("{addr} did not answer within {timeout:?}"))),
        }
    }

    pub async fn init_producer(&self) -> Result<u64> {
        let resp = self
            .call_any("init producer", |mut c| {
                let r = self.request(pb::InitProducerRequest {});
                async move { c.init_producer(r).await }
            })
            .await?;
        Ok(resp.producer_id)
    }

    /// The number of partitions of `topic`, refreshing the metadata once if it is unknown.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(t) = self.metadata().topics.get(topic) {
            return Ok(t.partitions.len() as u32);
        }
        let md = self.refresh_metadata().await?;
        if let Some(t) = md.topics.get(topic) {
            return Ok(t.partitions.len() as u32);
        }
        // Absent from the listing: asked by name, the cluster says why (a topic this user may
        // not describe is left out of listings, and refused by name).
        let resp = self
            .call_any("metadata", |mut c| {
                let req = self.request(pb::MetadataRequest { topics: vec![topic.to_owned()] });
                async move { c.metadata(req).await }
            })
            .await?;
        resp.topics
            .iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions.len() as u32)
            .ok_or_else(|| ClientError::NotFound(format!("topic \"{topic}\" does not exist")))
    }

    /// Sends one produce request to the partition's leader, following leader hints and
    /// retrying until the delivery timeout. The same `base_sequence` is used on every attempt,
    /// so with a producer id a retry is never written twice.
    pub async fn produce(&self, req: pb::ProduceRequest) -> Result<pb::ProduceResponse> {
        let (topic, partition) = (req.topic.clone(), req.partition.unwrap_or(0));
        self.leader_call(
            &topic,
            partition,
            "produce",
            self.inner.config.delivery_timeout,
            |ch, timeout| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(timeout);
                async move {
                    BrokerClient::new(ch)
                        .max_encoding_message_size(RESPONSE_BYTES_MAX)
                        .produce(r)
                        .await
                }
            },
        )
        .await
    }

    /// Moves the leadership of a partition to node `to`; returns the new leader.
    pub async fn transfer_leadership(&self, topic: &str, partition: u32, to: u64) -> Result<u64> {
        let req = pb::TransferLeadershipRequest { topic: topic.to_owned(), partition, to_node: to };
        let resp = self
            .leader_call(
                topic,
                partition,
                "transfer leadership",
                self.inner.config.request_timeout,
                |ch, timeout| {
                    let mut r = tonic::Request::new(req.clone());
                    r.set_timeout(timeout);
                    async move { AdminClient::new(ch).transfer_leadership(r).await }
                },
            )
            .await?;
        Ok(resp.leader)
    }

    /// Runs `call` on the partition's leader: follows `not_leader` hints at once, and retries
    /// other retriable errors with backoff and fresh metadata, until `budget` has passed.
    async fn leader_call<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        what: &str,
        budget: Duration,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Chan, Duration) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + budget;
        let mut backoff = Backoff::new(&self.inner.config);
        let mut target: Option<String> = None;
        let mut last = ClientError::Unavailable(format!("{what}: no attempt made"));
        loop {
            if Instant::now() >= deadline {
                return Err(last);
            }
            let addr = match target.take() {
                Some(a) => a,
                None => self.leader_addr(topic, partition).await,
            };
            let channel = self.channel(&addr)?;
            let attempt_timeout =
                self.inner.config.request_timeout.min(deadline.saturating_duration_since(Instant::now()));
            let answer = tokio::time::timeout(attempt_timeout, call(channel, attempt_timeout)).await;
            self.note_answer(&addr, answered(&answer));
            let mut retry_after = None;
            let err = match answer {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => {
                    retry_after = status
                        .metadata()
                        .get(eddy_proto::error_keys::RETRY_AFTER_MS)
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .map(Duration::from_millis);
                    ClientError::from_status(&status)
                }
                Err(_) => ClientError::Unavailable(format!("{what}: {addr} did not answer in time")),
            };
            match &err {
                ClientError::Server { code, leader_addr: Some(l), .. } if code == error_codes::NOT_LEADER => {
                    target = Some(l.clone());
                    last = err;
                    // The hint may be fresher than our metadata; go there without a long pause.
                    tokio::time::sleep(self.inner.config.backoff_min).await;
                    continue;
                }
                // Over a quota: wait as long as the node says (nothing was written).
                ClientError::Server { code, .. } if code == error_codes::THROTTLED => {
                    let wait = retry_after.unwrap_or(self.inner.config.backoff_max);
                    tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
                    last = err;
                    continue;
                }
                // A topic created (or grown) moments ago may not have reached every node yet: a
                // node's NotFound is `unknown_topic` or `unknown_partition`.
                ClientError::NotFound(_) => {}
                e if e.is_retriable() => {}
                _ => return Err(err),
            }
            last = err;
            backoff.wait().await;
            let _ = self.refresh_metadata().await;
        }
    }

    /// The client address of the partition's leader as far as known; if that broker did not
    /// answer lately, a replica of the partition that did (it sends the request on to the new
    /// leader once one is elected, or leads itself); else any broker.
    async fn leader_addr(&self, topic: &str, partition: u32) -> String {
        let md = self.metadata();
        match md.route(topic, partition, &self.unresponsive()) {
            Some(a) => a.to_owned(),
            None => self.candidates().into_iter().next().unwrap_or_else(|| self.inner.bootstrap[0].clone()),
        }
    }

    /// Creates user `name` (or gives an existing one a new token when `replace`) and returns
    /// its token: made here, from the OS's randomness, and sent to no node; the cluster stores
    /// only what verifies it.
    pub async fn create_user(&self, name: &str, replace: bool) -> Result<Token> {
        let mut secret = [0u8; eddy_proto::credentials::SECRET_BYTES];
        let mut salts = [[0u8; eddy_proto::credentials::SALT_BYTES]; 3];
        getrandom::fill(&mut secret).map_err(|e| ClientError::Unavailable(format!("OS randomness: {e}")))?;
        for s in &mut salts {
            getrandom::fill(s).map_err(|e| ClientError::Unavailable(format!("OS randomness: {e}")))?;
        }
        self.create_user_from(name, replace, &secret, &salts).await
    }

    /// [`Client::create_user`] with the token's secret and the verifiers' salts given (the
    /// simulator's, drawn from its seed).
    pub async fn create_user_from(
        &self,
        name: &str,
        replace: bool,
        secret: &[u8; eddy_proto::credentials::SECRET_BYTES],
        salts: &[[u8; eddy_proto::credentials::SALT_BYTES]; 3],
    ) -> Result<Token> {
        eddy_proto::credentials::validate_user_name(name)
            .map_err(|e| ClientError::Invalid(format!("user: {e}")))?;
        let token = eddy_proto::credentials::token(name, secret);
        let req = pb::CreateUserRequest {
            name: name.to_owned(),
            credentials: Some(eddy_proto::credentials::credentials(&token, salts)),
            replace,
        };
        self.admin_any("create user", |mut c| {
            let r = self.request(req.clone());
            async move { c.create_user(r).await }
        })
        .await?;
        Ok(Token(token))
    }

    /// Deletes a user; false when there was none.
    pub async fn delete_user(&self, name: &str) -> Result<bool> {
        let req = pb::DeleteUserRequest { name: name.to_owned() };
        let r = self
            .admin_any("delete user", |mut c| {
                let r = self.request(req.clone());
                async move { c.delete_user(r).await }
            })
            .await?;
        Ok(r.deleted)
    }

    pub async fn list_users(&self) -> Result<Vec<String>> {
        let r = self
            .admin_any("list users", |mut c| {
                let r = self.request(pb::ListUsersRequest {});
                async move { c.list_users(r).await }
            })
            .await?;
        Ok(r.users)
    }

    /// Adds an ACL binding; false when it existed.
    pub async fn add_acl(&self, b: pb::AclBinding) -> Result<bool> {
        let r = self
            .admin_any("add acl", |mut c| {
                let r = self.request(b.clone());
                async move { c.add_acl(r).await }
            })
            .await?;
        Ok(r.added)
    }

    /// Removes an ACL binding; false when there was none.
    pub async fn remove_acl(&self, b: pb::AclBinding) -> Result<bool> {
        let r = self
            .admin_any("remove acl", |mut c| {
                let r = self.request(b.clone());
                async move { c.remove_acl(r).await }
            })
            .await?;
        Ok(r.removed)
    }

    pub async fn list_acls(&self) -> Result<Vec<pb::AclBinding>> {
        let r = self
            .admin_any("list acls", |mut c| {
                let r = self.request(pb::ListAclsRequest {});
                async move { c.list_acls(r).await }
            })
            .await?;
        Ok(r.bindings)
    }

    /// Sets a user's byte-rate quotas (both `None` removes them).
    pub async fn set_quota(&self, q: pb::Quota) -> Result<()> {
        self.admin_any("set quota", |mut c| {
            let r = self.request(q.clone());
            async move { c.set_quota(r).await }
        })
        .await?;
        Ok(())
    }

    pub async fn list_quotas(&self) -> Result<Vec<pb::Quota>> {
        let r = self
            .admin_any("list quotas", |mut c| {
                let r = self.request(pb::ListQuotasRequest {});
                async move { c.list_quotas(r).await }
            })
            .await?;
        Ok(r.quotas)
    }

    /// Who the cluster takes this client for.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIResponse> {
        self.admin_any("who am i", |mut c| {
            let r = self.request(pb::WhoAmIRequest {});
            async move { c.who_am_i(r).await }
        })
        .await
    }

    pub async fn list_nodes(&self) -> Result<pb::ListNodesResponse> {
        self.admin_any("list nodes", |mut c| {
            let r = self.request(pb::ListNodesRequest {});
            async move { c.list_nodes(r).await }
        })
        .await
    }

    /// Sets a node's state: `active` (undrain), `draining` or `decommissioning`.
    pub async fn set_node_state(&self, node_id: u64, state: &str) -> Result<pb::SetNodeStateResponse> {
        let req = pb::SetNodeStateRequest { node_id, state: state.to_owned() };
        self.admin_any("set node state", |mut c| {
            let r = self.request(req.clone());
            async move { c.set_node_state(r).await }
        })
        .await
    }

    pub async fn cluster_health(&self) -> Result<pb::ClusterHealthResponse> {
        self.admin_any("cluster health", |mut c| {
            let r = self.request(pb::ClusterHealthRequest {});
            async move { c.cluster_health(r).await }
        })
        .await
    }

    pub async fn balance_leaders(&self) -> Result<pb::BalanceLeadersResponse> {
        self.admin_any("balance leaders", |mut c| {
            let r = self.request(pb::BalanceLeadersRequest {});
            async move { c.balance_leaders(r).await }
        })
        .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let req = pb::DeleteTopicRequest { name: name.to_owned() };
        self.admin_any("delete topic", |mut c| {
            let r = self.request(req.clone());
            async move { c.delete_topic(r).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
    ) -> Result<pb::AlterTopicConfigResponse> {
        let req = pb::AlterTopicConfigRequest { name: name.to_owned(), set: set.into_iter().collect() };
        self.admin_any("alter topic config", |mut c| {
            let r = self.request(req.clone());
            async move { c.alter_topic_config(r).await }
        })
        .await
    }

    pub async fn add_partitions(&self, name: &str, count: u32) -> Result<pb::AddPartitionsResponse> {
        let req = pb::AddPartitionsRequest { name: name.to_owned(), count };
        self.admin_any("add partitions", |mut c| {
            let r = self.request(req.clone());
            async move { c.add_partitions(r).await }
        })
        .await
    }

    pub async fn move_partition(&self, topic: &str, partition: u32, replicas: Vec<u64>) -> Result<()> {
        let req = pb::MovePartitionRequest { topic: topic.to_owned(), partition, replicas };
        self.admin_any("move partition", |mut c| {
            let r = self.request(req.clone());
            async move { c.move_partition(r).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn list_moves(&self) -> Result<pb::ListMovesResponse> {
        self.admin_any("list moves", |mut c| {
            let r = self.request(pb::ListMovesRequest {});
            async move { c.list_moves(r).await }
        })
        .await
    }

    pub async fn cancel_move(&self, topic: &str, partition: u32) -> Result<()> {
        let req = pb::CancelMoveRequest { topic: topic.to_owned(), partition };
        self.admin_any("cancel move", |mut c| {
            let r = self.request(req.clone());
            async move { c.cancel_move(r).await }
        })
        .await
        .map(|_| ())
    }

    /// The replicas to try for a fetch, best first.
    fn fetch_targets(&self, topic: &str, partition: u32, choice: ReplicaChoice) -> Vec<String> {
        let md = self.metadata();
        let Some(p) = md.partition(topic, partition) else {
            return self.candidates();
        };
        let addr = |n: u64| md.client_addr(n).map(str::to_owned);
        let mut v = match choice {
            ReplicaChoice::Node(n) => return addr(n).into_iter().collect(),
            ReplicaChoice::Leader => {
                let mut v: Vec<String> = p.leader.and_then(addr).into_iter().collect();
                v.extend(
                    p.replicas.iter().filter_map(|r| addr(*r)).filter(|a| !v.contains(a)).collect::<Vec<_>>(),
                );
                v
            }
            ReplicaChoice::Follower => {
                let mut v: Vec<String> =
                    p.replicas.iter().filter(|r| Some(**r) != p.leader).filter_map(|r| addr(*r)).collect();
                v.extend(p.leader.and_then(addr));
                v
            }
        };
        // Replicas that recently did not answer go last, in the same order: a switched-off one
        // the metadata still lists must not cost every read its whole deadline.
        let unresponsive = self.unresponsive();
        v.sort_by_key(|a| unresponsive.contains(a));
        v
    }

    /// Reads from `offset`. Tries the chosen replicas in order; a replica that cannot answer is
    /// skipped (for [`ReplicaChoice::Node`] there is no other, so it is retried until timeout).
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        choice: ReplicaChoice,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<pb::FetchResponse> {
        self.fetch_records(topic, partition, offset, choice, max_bytes, 0, max_wait).await
    }

    /// [`Client::fetch`] with a bound on the records returned (0: no bound).
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_records(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        choice: ReplicaChoice,
        max_bytes: u32,
        max_records: u32,
        max_wait: Duration,
    ) -> Result<pb::FetchResponse> {
        let req = pb::FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes,
            max_wait_ms: max_wait.as_millis() as u32,
            max_records,
        };
        let timeout = self.inner.config.request_timeout + max_wait;
        self.call_replicas("fetch", (topic, partition), choice, timeout, |mut c, remaining| {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(remaining);
            async move { c.fetch(r).await }
        })
        .await
    }

    /// Looks up an offset of a partition (by time, or its earliest or latest offset), asking
    /// the leader first and any other replica if it cannot answer.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<pb::ListOffsetsResponse> {
        self.list_offsets_on(topic, partition, spec, ReplicaChoice::Leader).await
    }

    /// [`Client::list_offsets`] on the replica of your choice (replicas agree on offsets and
    /// timestamps, but one that installed a snapshot starts later).
    pub async fn list_offsets_on(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
        choice: ReplicaChoice,
    ) -> Result<pb::ListOffsetsResponse> {
        if self.metadata().partition(topic, partition).is_none() {
            self.refresh_metadata().await?;
        }
        let (kind, timestamp_ms) = spec.to_proto();
        let req =
            pb::ListOffsetsRequest { topic: topic.to_owned(), partition, spec: kind as i32, timestamp_ms };
        let timeout = self.inner.config.request_timeout;
        self.call_replicas("list offsets", (topic, partition), choice, timeout, |mut c, remaining| {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(remaining);
            async move { c.list_offsets(r).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(leader: Option<u64>) -> ClusterMetadata {
        let node = |id: u64| pb::NodeInfo {
            id,
            client_addr: format!("n{id}:9092"),
            raft_addr: String::new(),
            state: "active".into(),
            ..Default::default()
        };
        let partition =
            pb::PartitionMetadata { partition: 0, leader, replicas: vec![1, 2, 3], ..Default::default() };
        ClusterMetadata {
            nodes: (1..=3).map(|i| (i, node(i))).collect(),
            metadata_leader: None,
            topics: BTreeMap::from([(
                "t".to_owned(),
                pb::TopicMetadata { name: "t".into(), partitions: vec![partition], ..Default::default() },
            )]),
            limits: pb::Limits::default(),
            answered_by: 1,
        }
    }

    #[test]
    fn a_write_whose_leader_does_not_answer_goes_to_a_replica_that_does() {
        let md = metadata(Some(1));
        assert_eq!(md.route("t", 0, &[]), Some("n1:9092"), "the leader while it answers");
        assert_eq!(md.route("t", 0, &["n1:9092".into()]), Some("n2:9092"));
        assert_eq!(md.route("t", 0, &["n1:9092".into(), "n2:9092".into()]), Some("n3:9092"));
        let all: Vec<String> = (1..=3).map(|i| format!("n{i}:9092")).collect();
        assert_eq!(md.route("t", 0, &all), Some("n1:9092"), "nobody answers: the leader after all");
        assert_eq!(metadata(None).route("t", 0, &[]), Some("n1:9092"), "no leader known: a replica");
        assert_eq!(metadata(None).route("t", 0, &["n1:9092".into()]), Some("n2:9092"));
        assert_eq!(metadata(None).route("t", 0, &all), Some("n1:9092"));
        assert_eq!(md.route("t", 1, &[]), None, "an unknown partition");
    }
}
