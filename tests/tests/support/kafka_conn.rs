//! A blocking Kafka connection for tests, speaking the protocol with `kafka-protocol`'s codecs:
//! plaintext, or TLS (rustls, optionally with a client certificate), and SASL PLAIN.
//! Shared by `kafka.rs` and `acl_matrix.rs`.

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use anyhow::ensure;
use bytes::Buf;
use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::RequestHeader;
use kafka_protocol::messages::ResponseHeader;
use kafka_protocol::messages::SaslAuthenticateRequest;
use kafka_protocol::messages::SaslAuthenticateResponse;
use kafka_protocol::messages::SaslHandshakeRequest;
use kafka_protocol::messages::SaslHandshakeResponse;
use kafka_protocol::protocol::Decodable;
use kafka_protocol::protocol::Encodable;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use kafka_protocol::records::Record;
use kafka_protocol::records::RecordBatchEncoder;
use kafka_protocol::records::RecordEncodeOptions;
use kafka_protocol::records::TimestampType;

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A byte stream: a TCP socket, or TLS over one.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking Kafka connection that sends one request and reads its answer.
pub struct Conn {
    pub stream: Box<dyn Stream>,
    correlation: i32,
}

/// TLS for [`Conn::open_tls`]: the CA's PEM, and a client certificate and key (PEM) to present.
#[derive(Clone)]
pub struct Tls {
    pub ca: String,
    pub identity: Option<(String, String)>,
}

fn socket(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

impl Conn {
    pub fn open(addr: &str) -> anyhow::Result<Self> {
        Ok(Self { stream: Box::new(socket(addr)?), correlation: 0 })
    }

    /// A TLS connection to `addr` (a `127.0.0.1:PORT`; the node certificates name `localhost`
    /// and `127.0.0.1`).
    pub fn open_tls(addr: &str, tls: &Tls) -> anyhow::Result<Self> {
        Ok(Self { stream: tls_stream(addr, tls)?, correlation: 0 })
    }

    /// SaslHandshake v1 and SaslAuthenticate v2 with PLAIN: `user` and `password` (a token).
    pub fn sasl_plain(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        let mut hs = SaslHandshakeRequest::default();
        hs.mechanism = StrBytes::from_static_str("PLAIN");
        let r: SaslHandshakeResponse = self.call(ApiKey::SaslHandshake, 1, &hs)?;
        ensure!(r.error_code == 0, "PLAIN handshake: error {}", r.error_code);
        let mut auth = SaslAuthenticateRequest::default();
        auth.auth_bytes = Bytes::from(format!("\0{user}\0{password}"));
        let r: SaslAuthenticateResponse = self.call(ApiKey::SaslAuthenticate, 2, &auth)?;
        ensure!(r.error_code == 0, "SaslAuthenticate as {user}: {:?}", r.error_message);
        Ok(())
    }

    pub fn frame<Req: Encodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> anyhow::Result<(i32, Bytes)> {
        self.correlation += 1;
        let mut header = RequestHeader::default();
        header.request_api_key = key as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(StrBytes::from_static_str("eddy-test"));
        let mut body = BytesMut::new();
        header.encode(&mut body, key.request_header_version(version))?;
        req.encode(&mut body, version).with_context(|| format!("encode {key:?} v{version}"))?;
        let mut out = BytesMut::new();
        out.put_i32(body.len() as i32);
        out.extend_from_slice(&body);
        Ok((self.correlation, out.freeze()))
    }

    pub fn send<Req: Encodable>(&mut self, key: ApiKey, version: i16, req: &Req) -> anyhow::Result<i32> {
        let (correlation, frame) = self.frame(key, version, req)?;
        self.stream.write_all(&frame)?;
        self.stream.flush()?;
        Ok(correlation)
    }

    pub fn receive<Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        correlation: i32,
    ) -> anyhow::Result<Resp> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).with_context(|| format!("read the {key:?} v{version} response"))?;
        let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut frame)?;
        let mut frame = Bytes::from(frame);
        let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))?;
        ensure!(header.correlation_id == correlation, "{key:?} v{version}: responses out of order");
        let resp = Resp::decode(&mut frame, version).with_context(|| format!("decode {key:?} v{version}"))?;
        ensure!(!frame.has_remaining(), "{key:?} v{version}: {} bytes after the response", frame.remaining());
        Ok(resp)
    }

    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> anyhow::Result<Resp> {
        let c = self.send(key, version, req)?;
        self.receive(key, version, c)
    }

    /// Whether the server closed the connection (reads end) within the timeout.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(self.stream.read(&mut buf), Ok(0) | Err(_))
    }
}

/// A TLS stream to `addr` with its handshake done (so that a refused certificate fails here).
pub fn tls_stream(addr: &str, tls: &Tls) -> anyhow::Result<Box<dyn Stream>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(tls.ca.as_bytes()) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
        None => builder.with_no_client_auth(),
    };
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
    let name = rustls_pki_types::ServerName::try_from(host)?;
    let session = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut stream = rustls::StreamOwned::new(session, socket(addr)?);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).context("TLS handshake")?;
    }
    Ok(Box::new(stream))
}

/// A record with a key, a value, header `h`, and a timestamp.
pub fn record(key: &str, value: &str, header: &str, timestamp: i64) -> Record {
    let mut headers = IndexMap::new();
    headers.insert(StrBytes::from_static_str("h"), Some(Bytes::from(header.to_owned())));
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp,
        key: Some(Bytes::from(key.to_owned())),
        value: Some(Bytes::from(value.to_owned())),
        headers,
    }
}

/// A v2 record batch of `records`.
pub fn batch(records: &[Record], compression: Compression) -> anyhow::Result<Bytes> {
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(&mut out, records, &RecordEncodeOptions { version: 2, compression })?;
    Ok(out.freeze())
}
