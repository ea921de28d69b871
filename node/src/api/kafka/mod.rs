//! The Kafka listener (issue 10; work in progress: only `ApiVersions` so far).
//!
//! Kafka's framing: every request and response is a 4-byte big-endian length and that many
//! bytes. A request starts with its header (API key, API version, correlation id, client id; v2
//! adds tagged fields), whose version follows from the API key and version. A connection's
//! requests are answered one at a time, so responses go out in request order, as Kafka clients
//! require. The codecs are `kafka-protocol`'s, generated from Kafka's message schemas.

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
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::warn;

/// The largest request frame accepted (Kafka's `socket.request.max.bytes` default); a longer
/// one closes the connection.
pub const FRAME_BYTES_MAX: usize = 100 << 20;

/// Kafka's `UNSUPPORTED_VERSION` error code.
const UNSUPPORTED_VERSION: i16 = 35;

/// The APIs this listener answers, and their versions: only what is implemented and tested.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[(ApiKey::ApiVersions, 0, 3)];

/// Why a connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("request frame of {0} bytes is outside 8..={FRAME_BYTES_MAX}")]
    Size(i64),
    #[error("API key {key} version {version} is not supported by this listener")]
    Unsupported { key: i16, version: i16 },
    #[error("malformed request: {0}")]
    Malformed(String),
}

fn supported(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED.iter().find(|(k, _, _)| *k == key).map(|(_, lo, hi)| (*lo, *hi))
}

/// Accepts connections until `cancel`; each is served by a task of its own.
pub async fn serve(listener: TcpListener, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        r = connection(stream) => if let Err(e) = r {
                            debug!(%peer, "kafka connection closed: {e}");
                        }
                    }
                });
            }
            Err(e) => warn!("kafka listener: accept failed: {e}"),
        }
    }
}

/// Serves one connection: reads a frame, answers it, and so on until the peer closes.
async fn connection(mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let len = match stream.read_i32().await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !(8..=FRAME_BYTES_MAX as i64).contains(&i64::from(len)) {
            return Err(FrameError::Size(i64::from(len)).into());
        }
        let mut frame = vec![0u8; len as usize];
        stream.read_exact(&mut frame).await?;
        let response = handle(Bytes::from(frame))?;
        let mut out = BytesMut::with_capacity(4 + response.len());
        out.put_i32(response.len() as i32);
        out.extend_from_slice(&response);
        stream.write_all(&out).await?;
    }
}

/// Answers one request frame (without its length prefix); the response frame without its length.
pub fn handle(mut frame: Bytes) -> Result<Bytes, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::Size(frame.len() as i64));
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
        return Ok(api_versions_response(correlation_id, 0, UNSUPPORTED_VERSION));
    }
    if !(lo..=hi).contains(&version) {
        return Err(FrameError::Unsupported { key: raw_key, version });
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| FrameError::Malformed(format!("request header: {e}")))?;
    match key {
        ApiKey::ApiVersions => {
            ApiVersionsRequest::decode(&mut frame, version)
                .map_err(|e| FrameError::Malformed(format!("ApiVersions request: {e}")))?;
            Ok(api_versions_response(header.correlation_id, version, 0))
        }
        _ => Err(FrameError::Unsupported { key: raw_key, version }),
    }
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
            let (correlation_id, body) =
                response(handle(request(version, 40 + i32::from(version))).expect("answered"), version);
            assert_eq!(correlation_id, 40 + i32::from(version), "v{version}");
            assert_eq!(body.error_code, 0, "v{version}");
            let listed: Vec<(i16, i16, i16)> =
                body.api_keys.iter().map(|a| (a.api_key, a.min_version, a.max_version)).collect();
            assert_eq!(listed, vec![(ApiKey::ApiVersions as i16, 0, 3)], "v{version}");
        }
    }

    #[test]
    fn a_newer_api_versions_gets_the_v0_error_with_the_supported_range() {
        // Version 4 exists in Kafka but not here yet; the answer is v0-shaped whatever was asked.
        let (correlation_id, body) = response(handle(request(4, 7)).expect("answered"), 0);
        assert_eq!(correlation_id, 7);
        assert_eq!(body.error_code, UNSUPPORTED_VERSION);
        assert_eq!(body.api_keys.len(), 1);
        assert_eq!(body.api_keys[0].max_version, 3);
    }

    #[test]
    fn unsupported_and_malformed_requests_close_the_connection_with_a_reason() {
        let short = Bytes::from_static(&[0, 18, 0]);
        assert!(matches!(handle(short), Err(FrameError::Size(3))));
        // Metadata (key 3) is not implemented yet.
        let mut metadata = BytesMut::new();
        metadata.put_i16(3);
        metadata.put_i16(9);
        metadata.put_i32(1);
        metadata.put_i16(-1);
        let e = handle(metadata.freeze()).expect_err("refused");
        assert_eq!(e.to_string(), "API key 3 version 9 is not supported by this listener");
        // A valid header whose body is cut short.
        let full = request(3, 1);
        let cut = full.slice(..full.len() - 3);
        assert!(matches!(handle(cut), Err(FrameError::Malformed(_))), "a truncated body is malformed");
    }

    #[tokio::test]
    async fn a_connection_answers_pipelined_requests_in_order() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, cancel.clone()));
        let mut c = TcpStream::connect(addr).await?;
        let mut out = BytesMut::new();
        for (i, version) in [3i16, 0, 2, 1].into_iter().enumerate() {
            let r = request(version, i as i32);
            out.put_i32(r.len() as i32);
            out.extend_from_slice(&r);
        }
        c.write_all(&out).await?;
        for (i, version) in [3i16, 0, 2, 1].into_iter().enumerate() {
            let len = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_i32()).await??;
            let mut frame = vec![0u8; len as usize];
            c.read_exact(&mut frame).await?;
            let (correlation_id, body) = response(Bytes::from(frame), version);
            assert_eq!(correlation_id, i as i32, "responses come back in request order");
            assert_eq!(body.error_code, 0);
        }
        // An oversized frame closes the connection.
        c.write_all(&(FRAME_BYTES_MAX as i32 + 1).to_be_bytes()).await?;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut rest)).await??;
        assert_eq!(n, 0, "the server closed the connection without answering");
        cancel.cancel();
        server.await?;
        Ok(())
    }
}
