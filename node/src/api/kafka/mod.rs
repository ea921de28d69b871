//! The Kafka listener (issue 10): Kafka clients produce, fetch and look up metadata and offsets
//! over Eddy's services, as gRPC clients do.
//!
//! Kafka's framing: every request and response is a 4-byte big-endian length and that many
//! bytes. A request starts with its header (API key, API version, correlation id, client id; v2
//! adds tagged fields), whose version follows from the API key and version. A connection's
//! requests are answered one at a time, so responses go out in request order, as Kafka clients
//! require (and an idempotent producer's batches reach the log in the order it sent them). The
//! codecs are `kafka-protocol`'s, generated from Kafka's message schemas.
//!
//! A connection that sends something this listener cannot answer (a frame over the size limit,
//! an unknown API or version, a request that does not decode) is closed with a log line; the
//! node and its other connections carry on.

mod admin;
mod codes;
mod data;
mod group_requests;
pub mod groups;
mod metadata;
mod records;
pub mod sasl;

use std::sync::Arc;

use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::ApiVersionsRequest;
use kafka_protocol::messages::ApiVersionsResponse;
use kafka_protocol::messages::RequestHeader;
use kafka_protocol::messages::ResponseHeader;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::protocol::Decodable;
use kafka_protocol::protocol::Encodable;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing::warn;

use crate::security::AuthFailure;
use crate::security::AuthMethod;
use crate::security::Caller;
use crate::security::acl::Operation;
use crate::security::acl::Principal;
use crate::security::acl::ResourceType;
use crate::security::tls::CertIdentity;
use crate::service::BrokerState;

/// The largest request frame any listener accepts (Kafka's `socket.request.max.bytes`
/// default); the node's own limit is lower (see [`frame_bytes_max`]).
pub const FRAME_BYTES_MAX: usize = 100 << 20;

/// The APIs this listener answers, and their versions: only what is implemented and tested
/// (`tests/tests/kafka.rs` speaks every version listed here).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::CreateTopics, 2, 5),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    // v0 is listed because librdkafka requires it to see SASL at all; clients that know
    // SaslAuthenticate (Kafka 1.0+) use v1, and only that flow is served.
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// What every connection shares: the services, the consumer groups this node coordinates, and
/// the listener's settings.
pub struct Listener {
    pub broker: Arc<BrokerState>,
    pub groups: Arc<groups::KafkaGroups>,
    pub settings: Settings,
}

/// The node configuration's Kafka broker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `auto_create_topics`: `Metadata` for a topic that does not exist creates it.
    pub auto_create_topics: bool,
    /// `default_partitions` and `default_replication_factor`: for auto-created topics and a
    /// `CreateTopics` that asks for the broker's defaults.
    pub default_partitions: u32,
    pub default_replication_factor: u32,
}

impl Settings {
    pub fn from_config(c: &crate::config::NodeConfig) -> Self {
        Self {
            auto_create_topics: c.auto_create_topics,
            default_partitions: c.default_partitions,
            default_replication_factor: c.default_replication_factor,
        }
    }

    /// The replication factor a topic gets by default: the configured one, or every node of a
    /// smaller cluster.
    pub fn replication_for(&self, nodes: usize) -> u32 {
        self.default_replication_factor.min(u32::try_from(nodes).unwrap_or(u32::MAX)).max(1)
    }
}

/// The largest request frame this node takes: a produce request at the node's request limit,
/// plus room for the request's own fields.
pub fn frame_bytes_max(broker: &BrokerState) -> usize {
    (broker.limits.max_request_bytes as usize + (1 << 20)).min(FRAME_BYTES_MAX)
}

/// Why a connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("request frame of {size} bytes is outside 8..={max}")]
    Size { size: i64, max: usize },
    #[error("API key {key} version {version} is not supported by this listener")]
    Unsupported { key: i16, version: i16 },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("response to API key {key} version {version} does not encode: {reason}")]
    Encode { key: i16, version: i16, reason: String },
    #[error("the rest of a {0}-byte frame did not arrive within {FRAME_READ_TIMEOUT:?}")]
    Slow(usize),
    #[error("no request for {IDLE_TIMEOUT:?}")]
    Idle,
}

/// How long a client may take to send the rest of a frame once its length has arrived.
pub const FRAME_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A connection without a request for this long is closed (Kafka's `connections.max.idle.ms`).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads one request frame (without its length); `None` when the peer closed between frames.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R, max: usize) -> anyhow::Result<Option<Bytes>> {
    let len = match tokio::time::timeout(IDLE_TIMEOUT, r.read_i32()).await {
        Err(_) => return Err(FrameError::Idle.into()),
        Ok(Ok(n)) => n,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
    };
    if !(8..=max as i64).contains(&i64::from(len)) {
        return Err(FrameError::Size { size: i64::from(len), max }.into());
    }
    let mut frame = vec![0u8; len as usize];
    match tokio::time::timeout(FRAME_READ_TIMEOUT, r.read_exact(&mut frame)).await {
        Err(_) => Err(FrameError::Slow(len as usize).into()),
        Ok(r) => r.map(|_| Some(Bytes::from(frame))).map_err(Into::into),
    }
}

fn supported(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED.iter().find(|(k, _, _)| *k == key).map(|(_, lo, hi)| (*lo, *hi))
}

/// Accepts connections until `cancel`; each is served by a task of its own.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<BrokerState>,
    settings: Settings,
    cancel: CancellationToken,
) {
    // TLS (when configured) and the connection cap, as on every listener; a Kafka client
    // that speaks plaintext to a TLS listener is closed (the protocol has no way to say why).
    let tls = match &broker.tls {
        None => None,
        Some(m) => match m.server_config(m.require_client_cert, &[]) {
            Ok(c) => Some(tokio_rustls::TlsAcceptor::from(c)),
            Err(e) => {
                warn!("kafka listener: TLS configuration: {e:#}; not serving");
                return;
            }
        },
    };
    let guard = crate::security::tls::Guard {
        listener: "kafka",
        tls,
        max_connections: broker.config.max_connections,
        handshake_timeout: crate::security::tls::HANDSHAKE_TIMEOUT,
        metrics: broker.metrics.clone(),
        plaintext_answer: crate::security::tls::PlaintextAnswer::Close,
    };
    let incoming = crate::security::tls::guard(crate::env::tcp_incoming(listener), guard);
    let ctx = Arc::new(Listener { broker, groups: Arc::default(), settings });
    let ticks = tokio::spawn(groups::run_ticks(ctx.groups.clone(), cancel.clone()));
    accept(incoming, ctx, cancel).await;
    let _ = ticks.await;
}

async fn accept(mut incoming: crate::env::Incoming, ctx: Arc<Listener>, cancel: CancellationToken) {
    use futures::StreamExt;
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = incoming.next() => match a {
                Some(a) => a,
                None => return,
            },
        };
        match accepted {
            Ok(io) => {
                let cancel = cancel.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let peer = io.info.remote;
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        r = connection(io, &ctx) => if let Err(e) = r {
                            info!(?peer, "kafka connection closed: {e}");
                        }
                    }
                });
            }
            Err(e) => warn!("kafka listener: accept failed: {e}"),
        }
    }
}

/// Who a connection is: set from its client certificate, or by SASL.
struct Session {
    principal: Option<(Principal, AuthMethod)>,
    sasl: sasl::Sasl,
}

/// Serves one connection: reads a frame, answers it, and so on until the peer closes.
async fn connection(mut stream: crate::env::BoxedIo, ctx: &Listener) -> anyhow::Result<()> {
    let max = frame_bytes_max(&ctx.broker);
    let host = format!("/{}", stream.info.remote.map(|r| r.ip().to_string()).unwrap_or_default());
    let security = &ctx.broker.security;
    let enforce = ctx.broker.config.authentication.kafka;
    let mut session = Session {
        principal: match &stream.info.cert {
            Some(CertIdentity::User(u)) => Some((Principal::User(u.clone()), AuthMethod::Certificate)),
            Some(CertIdentity::Node(id)) => Some((Principal::Node(*id), AuthMethod::Certificate)),
            None if !enforce => Some((Principal::Anonymous, AuthMethod::None)),
            None => None,
        },
        sasl: sasl::Sasl::Start,
    };
    loop {
        let Some(frame) = read_frame(&mut stream, max).await? else { return Ok(()) };
        let mut mute = std::time::Duration::ZERO;
        let response = match parse(frame)? {
            Parsed::Answer(r) => Some(r),
            Parsed::Request(req) if matches!(req.key, ApiKey::SaslHandshake | ApiKey::SaslAuthenticate) => {
                let (response, close) = authenticate(ctx, &mut session, req)?;
                if close {
                    write_response(&mut stream, &response).await?;
                    anyhow::bail!("SASL authentication failed");
                }
                Some(response)
            }
            Parsed::Request(req) => {
                let Some((principal, via)) = &session.principal else {
                    security.metrics.auth_failure("kafka", AuthFailure::NoCredentials.reason());
                    anyhow::bail!("{:?} before SASL authentication (this listener requires it)", req.key);
                };
                // A user deleted since it authenticated is refused from then on.
                if *via == AuthMethod::Sasl
                    && let Principal::User(u) = principal
                    && !security.meta.view().state.users.contains_key(u)
                {
                    security.metrics.auth_failure("kafka", AuthFailure::UnknownUser.reason());
                    anyhow::bail!("user {u} was deleted; closing its connection");
                }
                // A fresh decision per request: ACL changes apply to open connections.
                let caller = security.caller(principal.clone(), *via, enforce, "kafka");
                dispatch(ctx, &host, &caller, req, &mut mute).await?
            }
        };
        // A produce with acks=0 gets no response at all.
        if let Some(response) = response {
            write_response(&mut stream, &response).await?;
        }
        // A client over its quota that throttles itself (KIP-219) is not read from meanwhile.
        tokio::time::sleep(std::mem::take(&mut mute)).await;
    }
}

/// How a quota's delay is served (KIP-219): produce from v6 and fetch from v8 answer at once
/// with `throttle_time_ms`, the client waits that long, and the broker reads nothing more from
/// it meanwhile (`mute`); older versions get their answer late instead.
async fn throttle(
    version: i16,
    kip219_from: i16,
    hold: std::time::Duration,
    mute: &mut std::time::Duration,
) -> i32 {
    let hold = hold.min(crate::security::quota::THROTTLE_MAX);
    if version >= kip219_from {
        *mute = hold;
    } else {
        tokio::time::sleep(hold).await;
    }
    i32::try_from(hold.as_millis()).unwrap_or(i32::MAX)
}

async fn write_response(stream: &mut crate::env::BoxedIo, response: &[u8]) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(4 + response.len());
    out.put_i32(response.len() as i32);
    out.extend_from_slice(response);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// `SaslHandshake` and `SaslAuthenticate`: the response, and whether to close the connection
/// after it (a failed authentication).
fn authenticate(
    ctx: &Listener,
    session: &mut Session,
    mut req: Request,
) -> Result<(Bytes, bool), FrameError> {
    use kafka_protocol::messages::SaslAuthenticateRequest;
    use kafka_protocol::messages::SaslAuthenticateResponse;
    use kafka_protocol::messages::SaslHandshakeRequest;
    use kafka_protocol::messages::SaslHandshakeResponse;
    use kafka_protocol::protocol::StrBytes;
    let security = &ctx.broker.security;
    if req.key == ApiKey::SaslHandshake {
        let body: SaslHandshakeRequest = req.decode()?;
        let mut out = SaslHandshakeResponse::default();
        out.mechanisms = sasl::MECHANISMS.iter().map(|m| StrBytes::from_static_str(m)).collect();
        match (&session.sasl, sasl::Mechanism::parse(body.mechanism.as_str())) {
            (sasl::Sasl::Start, Some(m)) => session.sasl = sasl::Sasl::Chosen(m),
            (sasl::Sasl::Start, None) => out.error_code = codes::UNSUPPORTED_SASL_MECHANISM,
            _ => out.error_code = codes::ILLEGAL_SASL_STATE,
        }
        return Ok((req.respond(&out)?, out.error_code != codes::NONE));
    }
    let body: SaslAuthenticateRequest = req.decode()?;
    let step = match std::mem::take(&mut session.sasl) {
        sasl::Sasl::Chosen(sasl::Mechanism::Plain) => sasl::plain(security, &body.auth_bytes),
        sasl::Sasl::Chosen(sasl::Mechanism::Scram(hash)) => {
            let mut nonce = [0u8; 18];
            if getrandom::fill(&mut nonce).is_err() {
                sasl::Step::Failed("no randomness for a nonce".into(), AuthFailure::BadToken)
            } else {
                use base64::Engine;
                let nonce = base64::engine::general_purpose::STANDARD.encode(nonce);
                match sasl::scram_first(security, hash, &body.auth_bytes, &nonce) {
                    Ok(state) => {
                        let first = state.server_first().as_bytes().to_vec();
                        session.sasl = sasl::Sasl::ScramFinal(state);
                        sasl::Step::Continue(first)
                    }
                    Err(step) => step,
                }
            }
        }
        sasl::Sasl::ScramFinal(state) => state.finish(&body.auth_bytes),
        sasl::Sasl::Start | sasl::Sasl::Done => {
            sasl::Step::Failed("SaslAuthenticate before a SaslHandshake".into(), AuthFailure::NoCredentials)
        }
    };
    let mut out = SaslAuthenticateResponse::default();
    let close = match step {
        sasl::Step::Continue(reply) => {
            out.auth_bytes = reply.into();
            false
        }
        sasl::Step::Authenticated { user, reply } => {
            out.auth_bytes = reply.into();
            info!(user = %user, "kafka client authenticated");
            session.principal = Some((Principal::User(user), AuthMethod::Sasl));
            session.sasl = sasl::Sasl::Done;
            false
        }
        sasl::Step::Failed(reason, failure) => {
            security.metrics.auth_failure("kafka", failure.reason());
            info!(reason = failure.reason(), "kafka SASL authentication failed: {reason}");
            out.error_code = codes::SASL_AUTHENTICATION_FAILED;
            out.error_message = Some(StrBytes::from_string(format!("authentication failed: {reason}")));
            true
        }
    };
    Ok((req.respond(&out)?, close))
}

/// A request, its header decoded and its body not yet.
pub struct Request {
    pub key: ApiKey,
    pub version: i16,
    pub header: RequestHeader,
    pub body: Bytes,
}

impl Request {
    /// The body as the request type `T`. Bytes after its fields are ignored, as Kafka's broker
    /// ignores them: librdkafka 2.12 asks for every topic's metadata (v9 and later) with a
    /// four-byte placeholder where a one-byte null array belongs, so its requests end with
    /// three bytes no field reads (found by its own test suite, `tests/tests/librdkafka.rs`).
    fn decode<T: Decodable>(&mut self) -> Result<T, FrameError> {
        let t = T::decode(&mut self.body, self.version)
            .map_err(|e| FrameError::Malformed(format!("{:?} v{}: {e}", self.key, self.version)))?;
        if self.body.has_remaining() {
            tracing::debug!(
                api = ?self.key,
                version = self.version,
                "kafka request: {} bytes after the request's fields, ignored",
                self.body.remaining()
            );
        }
        Ok(t)
    }

    /// The response frame (without its length) for `body`.
    fn respond<T: Encodable>(&self, body: &T) -> Result<Bytes, FrameError> {
        let mut header = ResponseHeader::default();
        header.correlation_id = self.header.correlation_id;
        let mut out = BytesMut::new();
        let encode_error = |e: anyhow::Error| FrameError::Encode {
            key: self.key as i16,
            version: self.version,
            reason: e.to_string(),
        };
        header.encode(&mut out, self.key.response_header_version(self.version)).map_err(encode_error)?;
        body.encode(&mut out, self.version).map_err(encode_error)?;
        Ok(out.freeze())
    }
}

/// What a frame turned out to be.
pub enum Parsed {
    /// Answered without the broker (`ApiVersions`).
    Answer(Bytes),
    Request(Request),
}

/// Reads a request frame (without its length prefix): its header, and for `ApiVersions` the
/// answer.
pub fn parse(mut frame: Bytes) -> Result<Parsed, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::Size { size: frame.len() as i64, max: FRAME_BYTES_MAX });
    }
    let (raw_key, version, correlation_id) =
        ((&frame[0..2]).get_i16(), (&frame[2..4]).get_i16(), (&frame[4..8]).get_i32());
    let key = ApiKey::try_from(raw_key).map_err(|()| FrameError::Unsupported { key: raw_key, version })?;
    let Some((lo, hi)) = supported(key) else {
        return Err(FrameError::Unsupported { key: raw_key, version });
    };
    if key == ApiKey::ApiVersions && !(lo..=hi).contains(&version) {
        // KIP-511: a client that asks with a version the broker does not know gets a v0 answer
        // with the error and the supported range, and retries with a version in it.
        return Ok(Parsed::Answer(api_versions_response(correlation_id, 0, codes::UNSUPPORTED_VERSION)));
    }
    if !(lo..=hi).contains(&version) {
        return Err(FrameError::Unsupported { key: raw_key, version });
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| FrameError::Malformed(format!("request header: {e}")))?;
    let mut req = Request { key, version, header, body: frame };
    if key == ApiKey::ApiVersions {
        req.decode::<ApiVersionsRequest>()?;
        return Ok(Parsed::Answer(api_versions_response(correlation_id, version, codes::NONE)));
    }
    Ok(Parsed::Request(req))
}

/// Answers a request; `None` for a request that gets no response (a produce with acks=0).
async fn dispatch(
    ctx: &Listener,
    host: &str,
    caller: &Caller,
    mut req: Request,
    mute: &mut std::time::Duration,
) -> Result<Option<Bytes>, FrameError> {
    use crate::security::quota::Direction;
    let (broker, groups) = (&*ctx.broker, &*ctx.groups);
    let version = req.version;
    let api = crate::metrics::ApiLabel { api: format!("{:?}", req.key) };
    broker.metrics.kafka_requests.get_or_create(&api).inc();
    match req.key {
        ApiKey::Metadata => {
            let body = req.decode()?;
            let r = metadata::metadata(broker, caller, &ctx.settings, body, req.version).await;
            req.respond(&r).map(Some)
        }
        ApiKey::Produce => {
            let body: kafka_protocol::messages::ProduceRequest = req.decode()?;
            let bytes: usize = body
                .topic_data
                .iter()
                .flat_map(|t| &t.partition_data)
                .filter_map(|p| p.records.as_ref())
                .map(bytes::Bytes::len)
                .sum();
            let produced = data::produce(broker, caller, body, req.version).await;
            let hold = broker.security.charge(&caller.principal, Direction::Produce, bytes as u64);
            match produced {
                Some(mut r) => {
                    r.throttle_time_ms = throttle(version, 6, hold, mute).await;
                    req.respond(&r).map(Some)
                }
                None => {
                    *mute = hold;
                    Ok(None)
                }
            }
        }
        ApiKey::Fetch => {
            let body = req.decode()?;
            let mut r = data::fetch(broker, caller, body, req.version).await;
            let bytes: usize = r
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .filter_map(|p| p.records.as_ref())
                .map(bytes::Bytes::len)
                .sum();
            let hold = broker.security.charge(&caller.principal, Direction::Fetch, bytes as u64);
            r.throttle_time_ms = throttle(version, 8, hold, mute).await;
            req.respond(&r).map(Some)
        }
        ApiKey::ListOffsets => {
            let body = req.decode()?;
            let r = data::list_offsets(broker, caller, body, req.version);
            req.respond(&r).map(Some)
        }
        ApiKey::InitProducerId => {
            let body = req.decode()?;
            let r = data::init_producer_id(broker, body).await;
            req.respond(&r).map(Some)
        }
        ApiKey::FindCoordinator => {
            let r = group_requests::find_coordinator(broker, caller, req.decode()?, version);
            req.respond(&r).map(Some)
        }
        // The group's members: read on the group (Kafka's rule), checked before the group
        // sees the request.
        ApiKey::JoinGroup => {
            let client_id = req.header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default();
            let body: kafka_protocol::messages::JoinGroupRequest = req.decode()?;
            let r = if may_read_group(caller, body.group_id.as_str()) {
                group_requests::join_group(broker, groups, body, version, &client_id, host).await
            } else {
                let mut r = kafka_protocol::messages::JoinGroupResponse::default();
                r.error_code = codes::GROUP_AUTHORIZATION_FAILED;
                r
            };
            req.respond(&r).map(Some)
        }
        ApiKey::SyncGroup => {
            let body: kafka_protocol::messages::SyncGroupRequest = req.decode()?;
            let r = if may_read_group(caller, body.group_id.as_str()) {
                group_requests::sync_group(broker, groups, body, version).await
            } else {
                let mut r = kafka_protocol::messages::SyncGroupResponse::default();
                r.error_code = codes::GROUP_AUTHORIZATION_FAILED;
                r
            };
            req.respond(&r).map(Some)
        }
        ApiKey::Heartbeat => {
            let body: kafka_protocol::messages::HeartbeatRequest = req.decode()?;
            let r = if may_read_group(caller, body.group_id.as_str()) {
                group_requests::heartbeat(broker, groups, body)
            } else {
                let mut r = kafka_protocol::messages::HeartbeatResponse::default();
                r.error_code = codes::GROUP_AUTHORIZATION_FAILED;
                r
            };
            req.respond(&r).map(Some)
        }
        ApiKey::LeaveGroup => {
            let body: kafka_protocol::messages::LeaveGroupRequest = req.decode()?;
            let r = if may_read_group(caller, body.group_id.as_str()) {
                group_requests::leave_group(broker, groups, body, version)
            } else {
                let mut r = kafka_protocol::messages::LeaveGroupResponse::default();
                r.error_code = codes::GROUP_AUTHORIZATION_FAILED;
                r
            };
            req.respond(&r).map(Some)
        }
        ApiKey::OffsetCommit => {
            let r = group_requests::offset_commit(broker, caller, groups, req.decode()?).await;
            req.respond(&r).map(Some)
        }
        ApiKey::OffsetFetch => {
            let r = group_requests::offset_fetch(broker, caller, req.decode()?);
            req.respond(&r).map(Some)
        }
        ApiKey::ListGroups => {
            let r = group_requests::list_groups(broker, caller, groups, req.decode()?);
            req.respond(&r).map(Some)
        }
        ApiKey::DescribeGroups => {
            let r = group_requests::describe_groups(broker, caller, groups, req.decode()?);
            req.respond(&r).map(Some)
        }
        ApiKey::CreateTopics => {
            let r = admin::create_topics(broker, caller, &ctx.settings, req.decode()?, version).await;
            req.respond(&r).map(Some)
        }
        ApiKey::DeleteTopics => {
            let r = admin::delete_topics(broker, caller, req.decode()?, version).await;
            req.respond(&r).map(Some)
        }
        ApiKey::CreatePartitions => {
            let r = admin::create_partitions(broker, caller, req.decode()?).await;
            req.respond(&r).map(Some)
        }
        ApiKey::DescribeConfigs => {
            let r = admin::describe_configs(broker, caller, &ctx.settings, req.decode()?, version);
            req.respond(&r).map(Some)
        }
        ApiKey::AlterConfigs => {
            let r = admin::alter_configs(broker, caller, req.decode()?).await;
            req.respond(&r).map(Some)
        }
        ApiKey::IncrementalAlterConfigs => {
            let r = admin::incremental_alter_configs(broker, caller, req.decode()?).await;
            req.respond(&r).map(Some)
        }
        _ => Err(FrameError::Unsupported { key: req.key as i16, version: req.version }),
    }
}

fn may_read_group(caller: &Caller, group: &str) -> bool {
    caller.check(Operation::Read, ResourceType::Group, group).is_ok()
}

fn api_versions_response(correlation_id: i32, version: i16, error_code: i16) -> Bytes {
    let mut body = ApiVersionsResponse::default();
    body.error_code = error_code;
    body.api_keys = SUPPORTED
        .iter()
        .map(|(k, lo, hi)| {
            let mut v = ApiVersion::default();
            v.api_key = *k as i16;
            v.min_version = *lo;
            v.max_version = *hi;
            v
        })
        .collect();
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    let mut out = BytesMut::new();
    // ApiVersions answers with response header v0 at every version (KIP-511).
    header.encode(&mut out, ApiKey::ApiVersions.response_header_version(version)).expect("header encodes");
    body.encode(&mut out, version).expect("ApiVersions response encodes");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use kafka_protocol::protocol::StrBytes;

    use super::*;

    fn answer(frame: Bytes) -> Bytes {
        match parse(frame) {
            Ok(Parsed::Answer(b)) => b,
            Ok(Parsed::Request(r)) => panic!("{:?} needs the broker", r.key),
            Err(e) => panic!("{e}"),
        }
    }

    fn request(version: i16, correlation_id: i32) -> Bytes {
        let mut header = RequestHeader::default();
        header.request_api_key = ApiKey::ApiVersions as i16;
        header.request_api_version = version;
        header.correlation_id = correlation_id;
        header.client_id = Some(StrBytes::from_static_str("test"));
        let mut out = BytesMut::new();
        header.encode(&mut out, ApiKey::ApiVersions.request_header_version(version)).expect("encode");
        let mut body = ApiVersionsRequest::default();
        if version >= 3 {
            body.client_software_name = StrBytes::from_static_str("eddy-test");
            body.client_software_version = StrBytes::from_static_str("1");
        }
        body.encode(&mut out, version).expect("encode");
        out.freeze()
    }

    fn response(mut frame: Bytes, version: i16) -> (i32, ApiVersionsResponse) {
        let header = ResponseHeader::decode(&mut frame, ApiKey::ApiVersions.response_header_version(version))
            .expect("response header");
        let body = ApiVersionsResponse::decode(&mut frame, version).expect("response body");
        assert!(frame.is_empty(), "{} bytes left over", frame.len());
        (header.correlation_id, body)
    }

    #[test]
    fn api_versions_answers_every_supported_version_with_the_supported_apis() {
        for version in 0..=3 {
            let (correlation_id, body) = response(answer(request(version, 40 + i32::from(version))), version);
            assert_eq!(correlation_id, 40 + i32::from(version), "v{version}");
            assert_eq!(body.error_code, 0, "v{version}");
            let listed: Vec<(i16, i16, i16)> =
                body.api_keys.iter().map(|a| (a.api_key, a.min_version, a.max_version)).collect();
            let expected: Vec<(i16, i16, i16)> =
                SUPPORTED.iter().map(|(k, lo, hi)| (*k as i16, *lo, *hi)).collect();
            assert_eq!(listed, expected, "v{version}");
        }
    }

    #[test]
    fn a_newer_api_versions_gets_the_v0_error_with_the_supported_range() {
        // Version 4 exists in Kafka but not here yet; the answer is v0-shaped whatever was asked.
        let (correlation_id, body) = response(answer(request(4, 7)), 0);
        assert_eq!(correlation_id, 7);
        assert_eq!(body.error_code, codes::UNSUPPORTED_VERSION);
        assert_eq!(body.api_keys.len(), SUPPORTED.len());
        let own = body.api_keys.iter().find(|a| a.api_key == ApiKey::ApiVersions as i16).expect("listed");
        assert_eq!(own.max_version, 3);
    }

    #[test]
    fn unsupported_and_malformed_requests_close_the_connection_with_a_reason() {
        let short = Bytes::from_static(&[0, 18, 0]);
        assert!(matches!(parse(short), Err(FrameError::Size { size: 3, .. })));
        // Metadata (key 3) v13 is not implemented; DescribeAcls (29) not at all.
        for (key, version) in [(3, 13), (29, 0), (999, 0)] {
            let mut req = BytesMut::new();
            req.put_i16(key);
            req.put_i16(version);
            req.put_i32(1);
            req.put_i16(-1);
            let Err(e) = parse(req.freeze()) else { panic!("{key} v{version} refused") };
            assert_eq!(
                e.to_string(),
                format!("API key {key} version {version} is not supported by this listener")
            );
        }
        // A valid header whose body is cut short.
        let full = request(3, 1);
        let cut = full.slice(..full.len() - 3);
        assert!(matches!(parse(cut), Err(FrameError::Malformed(_))), "a truncated body is malformed");
    }

    /// Decodes a request's body as its API's type (what `dispatch` does before answering).
    fn decode_body(mut req: Request) -> Result<(), FrameError> {
        use kafka_protocol::messages::*;
        match req.key {
            ApiKey::Produce => req.decode::<ProduceRequest>().map(drop),
            ApiKey::Fetch => req.decode::<FetchRequest>().map(drop),
            ApiKey::ListOffsets => req.decode::<ListOffsetsRequest>().map(drop),
            ApiKey::Metadata => req.decode::<MetadataRequest>().map(drop),
            ApiKey::InitProducerId => req.decode::<InitProducerIdRequest>().map(drop),
            ApiKey::FindCoordinator => req.decode::<FindCoordinatorRequest>().map(drop),
            ApiKey::JoinGroup => req.decode::<JoinGroupRequest>().map(drop),
            ApiKey::SyncGroup => req.decode::<SyncGroupRequest>().map(drop),
            ApiKey::Heartbeat => req.decode::<HeartbeatRequest>().map(drop),
            ApiKey::LeaveGroup => req.decode::<LeaveGroupRequest>().map(drop),
            ApiKey::OffsetCommit => req.decode::<OffsetCommitRequest>().map(drop),
            ApiKey::OffsetFetch => req.decode::<OffsetFetchRequest>().map(drop),
            ApiKey::ListGroups => req.decode::<ListGroupsRequest>().map(drop),
            ApiKey::DescribeGroups => req.decode::<DescribeGroupsRequest>().map(drop),
            ApiKey::CreateTopics => req.decode::<CreateTopicsRequest>().map(drop),
            ApiKey::DeleteTopics => req.decode::<DeleteTopicsRequest>().map(drop),
            ApiKey::CreatePartitions => req.decode::<CreatePartitionsRequest>().map(drop),
            ApiKey::DescribeConfigs => req.decode::<DescribeConfigsRequest>().map(drop),
            ApiKey::AlterConfigs => req.decode::<AlterConfigsRequest>().map(drop),
            ApiKey::IncrementalAlterConfigs => req.decode::<IncrementalAlterConfigsRequest>().map(drop),
            ApiKey::SaslHandshake => req.decode::<SaslHandshakeRequest>().map(drop),
            ApiKey::SaslAuthenticate => req.decode::<SaslAuthenticateRequest>().map(drop),
            k => panic!("{k:?} is in SUPPORTED but not here"),
        }
    }

    /// A request header for `key` v`version`, then `body`.
    fn frame(key: ApiKey, version: i16, body: &[u8]) -> Bytes {
        let mut header = RequestHeader::default();
        header.request_api_key = key as i16;
        header.request_api_version = version;
        header.correlation_id = 9;
        header.client_id = Some(StrBytes::from_static_str("fuzz"));
        let mut out = BytesMut::new();
        header.encode(&mut out, key.request_header_version(version)).expect("encode");
        out.extend_from_slice(body);
        out.freeze()
    }

    /// Every supported (API, version).
    fn every_version() -> Vec<(ApiKey, i16)> {
        SUPPORTED.iter().flat_map(|(k, lo, hi)| (*lo..=*hi).map(move |v| (*k, v))).collect()
    }

    fn parse_and_decode(frame: Bytes) {
        if let Ok(Parsed::Request(req)) = parse(frame) {
            let _ = decode_body(req);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_and_idle_clients_are_disconnected() {
        // Half a frame, then nothing: refused after FRAME_READ_TIMEOUT.
        let (mut client, mut server) = tokio::io::duplex(1 << 10);
        client.write_all(&100i32.to_be_bytes()).await.expect("write");
        client.write_all(&[0, 18, 0]).await.expect("write");
        let e = read_frame(&mut server, 1 << 20).await.expect_err("slow");
        assert!(e.to_string().contains("did not arrive within"), "{e}");
        // Nothing at all: refused after IDLE_TIMEOUT.
        let (_client, mut server) = tokio::io::duplex(1 << 10);
        let started = tokio::time::Instant::now();
        let e = read_frame(&mut server, 1 << 20).await.expect_err("idle");
        assert!(e.to_string().starts_with("no request for"), "{e}");
        assert!(started.elapsed() >= IDLE_TIMEOUT);
        // A whole frame is read; a close between frames is the end, not an error.
        let (mut client, mut server) = tokio::io::duplex(1 << 10);
        client.write_all(&8i32.to_be_bytes()).await.expect("write");
        client.write_all(&[1; 8]).await.expect("write");
        drop(client);
        assert_eq!(
            read_frame(&mut server, 1 << 20).await.expect("a frame").expect("some"),
            Bytes::from_static(&[1; 8])
        );
        assert!(read_frame(&mut server, 1 << 20).await.expect("closed").is_none());
    }

    #[test]
    fn huge_declared_counts_are_refused_without_allocating() {
        // A body that starts with the largest count, as an i32 and as a compact (varint) length,
        // in front of a few bytes: the first array of every request must not be sized by it.
        let bodies: [&[u8]; 2] =
            [&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1], &[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 1]];
        for (key, version) in every_version() {
            for body in bodies {
                parse_and_decode(frame(key, version, body));
            }
        }
        // The 8-byte Metadata v0 frame from kafka-protocol-rs#152.
        let mut metadata = BytesMut::new();
        metadata.extend_from_slice(&[0, 3, 0, 0, 0, 0, 0, 1, 0xff, 0xff]);
        metadata.extend_from_slice(&[0x03, 0x3c, 0x0c, 0x00, 0xb6]);
        match parse(metadata.freeze()) {
            Ok(Parsed::Request(req)) => assert!(decode_body(req).is_err(), "refused"),
            Ok(Parsed::Answer(_)) => panic!("not an ApiVersions"),
            Err(_) => {}
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Random bodies behind a valid header of every supported API and version, and random
        /// frames: decoding fails or succeeds, and never panics or aborts.
        #[test]
        fn random_frames_never_panic(
            which in 0usize..1000,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let all = every_version();
            let (key, version) = all[which % all.len()];
            parse_and_decode(frame(key, version, &body));
            parse_and_decode(Bytes::from(raw));
        }

        /// Valid requests with bytes flipped, cut short or stretched.
        #[test]
        fn mutated_requests_never_panic(
            which in 0usize..1000,
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..4096),
        ) {
            let all = every_version();
            let (key, version) = all[which % all.len()];
            let valid = valid_request(key, version);
            let mut bytes = valid.to_vec();
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= b;
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            parse_and_decode(Bytes::from(bytes));
        }
    }

    /// A well-formed request of `key` v`version` with some content (a topic, a partition, a
    /// record batch for Produce), to mutate.
    fn valid_request(key: ApiKey, version: i16) -> Bytes {
        use kafka_protocol::messages::*;
        let topic = TopicName(StrBytes::from_static_str("orders"));
        let mut body = BytesMut::new();
        let enc =
            |body: &mut BytesMut, r: &dyn Fn(&mut BytesMut) -> anyhow::Result<()>| r(body).expect("encodes");
        match key {
            ApiKey::Produce => {
                let records = records::encode_fetched(
                    &[crate::partition::handle::FetchedRecord {
                        offset: 0,
                        record: crate::partition::command::StoredRecord {
                            key: Some(Bytes::from_static(b"k")),
                            value: Bytes::from_static(b"v"),
                            headers: vec![("h".into(), Bytes::from_static(b"x"))],
                            timestamp_ms: 1,
                        },
                    }],
                    false,
                );
                let mut p = produce_request::PartitionProduceData::default();
                p.records = Some(records);
                let mut t = produce_request::TopicProduceData::default();
                t.name = topic;
                t.partition_data = vec![p];
                let mut r = ProduceRequest::default();
                r.topic_data = vec![t];
                enc(&mut body, &|b| r.encode(b, version));
            }
            ApiKey::Fetch => {
                let mut t = fetch_request::FetchTopic::default();
                t.topic = topic;
                t.partitions = vec![fetch_request::FetchPartition::default()];
                let mut r = FetchRequest::default();
                r.topics = vec![t];
                enc(&mut body, &|b| r.encode(b, version));
            }
            ApiKey::Metadata => {
                let mut t = metadata_request::MetadataRequestTopic::default();
                t.name = Some(topic);
                let mut r = MetadataRequest::default();
                r.topics = Some(vec![t]);
                enc(&mut body, &|b| r.encode(b, version));
            }
            ApiKey::JoinGroup => {
                let mut p = join_group_request::JoinGroupRequestProtocol::default();
                p.name = StrBytes::from_static_str("range");
                let mut r = JoinGroupRequest::default();
                r.protocols = vec![p];
                enc(&mut body, &|b| r.encode(b, version));
            }
            // Every other API: its default request.
            ApiKey::ApiVersions => default::<ApiVersionsRequest>(&mut body, version),
            ApiKey::ListOffsets => default::<ListOffsetsRequest>(&mut body, version),
            ApiKey::InitProducerId => default::<InitProducerIdRequest>(&mut body, version),
            ApiKey::FindCoordinator => default::<FindCoordinatorRequest>(&mut body, version),
            ApiKey::SyncGroup => default::<SyncGroupRequest>(&mut body, version),
            ApiKey::Heartbeat => default::<HeartbeatRequest>(&mut body, version),
            ApiKey::LeaveGroup => default::<LeaveGroupRequest>(&mut body, version),
            ApiKey::OffsetCommit => default::<OffsetCommitRequest>(&mut body, version),
            ApiKey::OffsetFetch => default::<OffsetFetchRequest>(&mut body, version),
            ApiKey::ListGroups => default::<ListGroupsRequest>(&mut body, version),
            ApiKey::DescribeGroups => default::<DescribeGroupsRequest>(&mut body, version),
            ApiKey::CreateTopics => default::<CreateTopicsRequest>(&mut body, version),
            ApiKey::DeleteTopics => default::<DeleteTopicsRequest>(&mut body, version),
            ApiKey::CreatePartitions => default::<CreatePartitionsRequest>(&mut body, version),
            ApiKey::DescribeConfigs => default::<DescribeConfigsRequest>(&mut body, version),
            ApiKey::AlterConfigs => default::<AlterConfigsRequest>(&mut body, version),
            ApiKey::IncrementalAlterConfigs => default::<IncrementalAlterConfigsRequest>(&mut body, version),
            ApiKey::SaslHandshake => default::<SaslHandshakeRequest>(&mut body, version),
            ApiKey::SaslAuthenticate => default::<SaslAuthenticateRequest>(&mut body, version),
            k => panic!("{k:?} is in SUPPORTED but not here"),
        }
        frame(key, version, &body)
    }

    fn default<T: Encodable + Default>(body: &mut BytesMut, version: i16) {
        T::default().encode(body, version).expect("a default request encodes");
    }
}
