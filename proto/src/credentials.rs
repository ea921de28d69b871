//! User tokens and what verifies them, computed identically by `eddyctl` (which makes a token
//! and sends only its verifiers) and by a node (which checks a presented token against them).
//!
//! A token is `NAME.SECRET`: the user's name, a dot, and 32 random bytes in unpadded base64url
//! (which has no dot). The name in front lets a node find the user of a bearer token without
//! storing anything that identifies the token; the secret carries the entropy, so a salted
//! SHA-256 is enough to store it (a slow password hash protects guessable passwords, and a token
//! is not guessable). SCRAM needs its own verifiers (RFC 5802: salted PBKDF2, then the stored
//! and server keys), one per hash, with the whole token as the password.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::v1::ScramCredential;
use crate::v1::UserCredentials;

/// Random bytes in a token's secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of each salt.
pub const SALT_BYTES: usize = 16;
/// PBKDF2 iterations of the SCRAM credentials (Kafka's minimum, and the RFC's example).
pub const SCRAM_ITERATIONS: u32 = 4096;
/// The longest user name.
pub const USER_NAME_MAX: usize = 64;

/// The two SCRAM hashes Kafka clients offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    /// The SASL mechanism name.
    pub fn mechanism(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Self::Sha512 => {
                let mut m = hmac::Hmac::<sha2::Sha512>::new_from_slice(key).expect("HMAC takes any key");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Self::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// RFC 5802's `Hi()`: PBKDF2 with this HMAC.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(password, salt, iterations).to_vec()
            }
            Self::Sha512 => {
                pbkdf2::pbkdf2_hmac_array::<sha2::Sha512, 64>(password, salt, iterations).to_vec()
            }
        }
    }

    /// The server's credential for `password`.
    pub fn credential(self, password: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let salted = self.salted_password(password, salt, iterations);
        let client_key = self.hmac(&salted, b"Client Key");
        ScramCredential {
            salt: salt.to_vec().into(),
            iterations,
            stored_key: self.hash(&client_key).into(),
            server_key: self.hmac(&salted, b"Server Key").into(),
        }
    }
}

/// Checks a user name: 1 to 64 of ASCII letters, digits, `.`, `_`, `-` and `@` (no character
/// that SASL or SCRAM would have to escape, and no `:` of a principal).
pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > USER_NAME_MAX {
        return Err(format!("a user name has 1 to {USER_NAME_MAX} characters, not {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "{name:?} has {c:?}; a user name is ASCII letters, digits, '.', '_', '-' and '@'"
        ));
    }
    Ok(())
}

/// A new token for `user` from `secret` (random bytes from the caller's source).
pub fn token(user: &str, secret: &[u8; SECRET_BYTES]) -> String {
    format!("{user}.{}", URL_SAFE_NO_PAD.encode(secret))
}

/// The user a token names, or `None` when it is not shaped like a token.
pub fn token_user(token: &str) -> Option<&str> {
    let (user, secret) = token.rsplit_once('.')?;
    (validate_user_name(user).is_ok() && !secret.is_empty()).then_some(user)
}

fn token_hash(salt: &[u8], token: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(token.as_bytes());
    h.finalize().into()
}

/// Everything that verifies `token`; `salts` are three random salts (token hash, SCRAM-SHA-256,
/// SCRAM-SHA-512).
pub fn credentials(token: &str, salts: &[[u8; SALT_BYTES]; 3]) -> UserCredentials {
    UserCredentials {
        token_salt: salts[0].to_vec().into(),
        token_hash: token_hash(&salts[0], token).to_vec().into(),
        scram_sha_256: Some(ScramHash::Sha256.credential(token.as_bytes(), &salts[1], SCRAM_ITERATIONS)),
        scram_sha_512: Some(ScramHash::Sha512.credential(token.as_bytes(), &salts[2], SCRAM_ITERATIONS)),
    }
}

/// Whether `token` is the one `creds` verify, in time independent of where they differ.
pub fn verify_token(creds: &UserCredentials, token: &str) -> bool {
    let h = token_hash(&creds.token_salt, token);
    creds.token_hash.len() == h.len() && bool::from(h.ct_eq(&creds.token_hash[..]))
}

/// Whether credentials are well formed (a node refuses others before storing them).
pub fn validate_credentials(c: &UserCredentials) -> Result<(), String> {
    if c.token_salt.len() < 8 || c.token_hash.len() != 32 {
        return Err("credentials: the token's salt must have at least 8 bytes and its hash 32".into());
    }
    for (hash, cred, len) in
        [(ScramHash::Sha256, &c.scram_sha_256, 32), (ScramHash::Sha512, &c.scram_sha_512, 64)]
    {
        let Some(cred) = cred else {
            return Err(format!("credentials: {} is missing", hash.mechanism()));
        };
        if cred.salt.len() < 8
            || cred.stored_key.len() != len
            || cred.server_key.len() != len
            || !(SCRAM_ITERATIONS..=100_000).contains(&cred.iterations)
        {
            return Err(format!(
                "credentials: {} needs a salt of at least 8 bytes, {len}-byte keys and {SCRAM_ITERATIONS} to 100000 iterations",
                hash.mechanism()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_against_its_credentials_only() {
        let t = token("alice", &[7; SECRET_BYTES]);
        assert!(t.starts_with("alice.") && !t[6..].contains('.'), "{t}");
        assert_eq!(token_user(&t), Some("alice"));
        assert_eq!(token_user("no-dot"), None);
        assert_eq!(token_user("bad name.x"), None);
        let c = credentials(&t, &[[1; SALT_BYTES], [2; SALT_BYTES], [3; SALT_BYTES]]);
        validate_credentials(&c).expect("well formed");
        assert!(verify_token(&c, &t));
        assert!(!verify_token(&c, &token("alice", &[8; SECRET_BYTES])));
        assert!(!verify_token(&c, ""));
        let text = format!("{c:?}");
        assert!(!text.contains(&t[6..]), "the credentials do not carry the secret");
    }

    #[test]
    fn scram_matches_rfc_7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==,
        // 4096 iterations; the server signature in its exchange follows from ServerKey.
        let salt = base64::engine::general_purpose::STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("b64");
        let c = ScramHash::Sha256.credential(b"pencil", &salt, 4096);
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server_signature = ScramHash::Sha256.hmac(&c.server_key, auth_message.as_bytes());
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "svc.orders-eu_1", "a@b.c", &"x".repeat(64)] {
            validate_user_name(ok).expect(ok);
        }
        for bad in ["", "User:alice", "a b", "a,b", "a=b", &"x".repeat(65)] {
            assert!(validate_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
