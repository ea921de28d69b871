//! Users with secret credentials, as the metadata group stores them: what verifies a token
//! (never the token; see `eddy_proto::credentials`).

use eddy_proto::credentials::ScramHash;
use eddy_proto::v1::ScramCredential;
use eddy_proto::v1::UserCredentials;
use serde::Deserialize;
use serde::Serialize;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub token_salt: Vec<u8>,
    pub token_hash: Vec<u8>,
    pub scram_sha_256: ScramRecord,
    pub scram_sha_512: ScramRecord,
}

/// Salted hashes are not secrets, but they let whoever holds them try tokens offline; they stay
/// out of logs too.
impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserRecord { .. }")
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramRecord {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramRecord {
    fn from_proto(c: &ScramCredential) -> Self {
        Self {
            salt: c.salt.to_vec(),
            iterations: c.iterations,
            stored_key: c.stored_key.to_vec(),
            server_key: c.server_key.to_vec(),
        }
    }
}

impl UserRecord {
    /// Checks and converts credentials as the API carries them; the error says what is wrong.
    pub fn from_proto(c: &UserCredentials) -> Result<Self, String> {
        eddy_proto::credentials::validate_credentials(c)?;
        let scram = |c: &Option<ScramCredential>| ScramRecord::from_proto(c.as_ref().expect("validated"));
        Ok(Self {
            token_salt: c.token_salt.to_vec(),
            token_hash: c.token_hash.to_vec(),
            scram_sha_256: scram(&c.scram_sha_256),
            scram_sha_512: scram(&c.scram_sha_512),
        })
    }

    /// Whether `token` is this user's, in constant time.
    pub fn verify_token(&self, token: &str) -> bool {
        let c = UserCredentials {
            token_salt: self.token_salt.clone().into(),
            token_hash: self.token_hash.clone().into(),
            scram_sha_256: None,
            scram_sha_512: None,
        };
        eddy_proto::credentials::verify_token(&c, token)
    }

    pub fn scram(&self, hash: ScramHash) -> &ScramRecord {
        match hash {
            ScramHash::Sha256 => &self.scram_sha_256,
            ScramHash::Sha512 => &self.scram_sha_512,
        }
    }
}
