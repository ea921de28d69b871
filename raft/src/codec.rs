//! Encoding of Raft messages inside the `eddy.v1.Raft` envelopes: postcard over serde, which
//! openraft's types support. Decode failures are answered as `INVALID_ARGUMENT`, never a panic.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Status;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("Raft messages always encode")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    postcard::from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("payload: not a valid {what}: {e}")))
}
