//! Client errors, classified by what a caller can do about them.

use eddy_proto::error_codes;
use eddy_proto::error_keys;
use tonic::Code;
use tonic::Status;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The request is wrong and retrying will not help; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Nothing answered, or the cluster could not complete the request in time.
    #[error("{0}")]
    Unavailable(String),
    /// The offset asked for is below the log start of the replica that answered (retention
    /// deleted it); `log_start_offset` is where that replica's log starts.
    #[error("{message}")]
    OffsetOutOfRange { message: String, log_start_offset: Option<u64> },
    /// The server reported an error; `code` is its `eddy-error` code.
    #[error("{message}")]
    Server { code: String, message: String, leader_addr: Option<String> },
}

impl ClientError {
    pub fn from_status(s: &Status) -> Self {
        let md = s.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let code = get(error_keys::CODE);
        let message = s.message().to_owned();
        match (s.code(), code) {
            (_, Some(code)) => {
                let leader_addr = get(error_keys::LEADER_ADDR);
                match code.as_str() {
                    error_codes::INVALID_ARGUMENT | error_codes::NOT_ENOUGH_NODES => Self::Invalid(message),
                    error_codes::UNKNOWN_TOPIC | error_codes::UNKNOWN_PARTITION => Self::NotFound(message),
                    error_codes::TOPIC_EXISTS => Self::AlreadyExists(message),
                    error_codes::OFFSET_OUT_OF_RANGE => Self::OffsetOutOfRange {
                        message,
                        log_start_offset: get(error_keys::LOG_START_OFFSET).and_then(|v| v.parse().ok()),
                    },
                    _ => Self::Server { code, message, leader_addr },
                }
            }
            (Code::InvalidArgument | Code::OutOfRange, None) => Self::Invalid(message),
            (Code::NotFound, None) => Self::NotFound(message),
            (Code::AlreadyExists, None) => Self::AlreadyExists(message),
            (c, None) => Self::Unavailable(format!("{c:?}: {message}")),
        }
    }

    /// The server's `eddy-error` code, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Server { code, .. } => Some(code),
            Self::OffsetOutOfRange { .. } => Some(error_codes::OFFSET_OUT_OF_RANGE),
            _ => None,
        }
    }

    /// Whether the same request may succeed later or elsewhere.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Server { code, .. } => {
                matches!(
                    code.as_str(),
                    error_codes::NOT_LEADER
                        | error_codes::NOT_REPLICA
                        | error_codes::UNAVAILABLE
                        | error_codes::TIMEOUT
                        | error_codes::THROTTLED
                        | error_codes::DISK_FULL
                )
            }
            _ => false,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
