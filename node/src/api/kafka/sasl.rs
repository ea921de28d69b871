//! SASL on the Kafka listener (KIP-43 and KIP-152): `SaslHandshake` v1 names a mechanism, then
//! `SaslAuthenticate` requests carry its messages. PLAIN takes a user's token as the password;
//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677) check the token against the SCRAM
//! credentials `eddyctl user create` stored, so the token never crosses the wire. A failure
//! answers `SASL_AUTHENTICATION_FAILED` with a reason that names no secret, and the connection
//! closes after it, as Kafka's broker does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use eddy_proto::credentials::ScramHash;
use subtle::ConstantTimeEq;

use crate::security::AuthFailure;
use crate::security::Security;

/// The mechanisms offered, in the handshake's answer.
pub const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// Where a connection is in its SASL exchange.
#[derive(Debug, Default)]
pub enum Sasl {
    /// No handshake yet.
    #[default]
    Start,
    /// A handshake named this mechanism; its first message is next.
    Chosen(Mechanism),
    /// SCRAM: the server's first message went out; the client's final message is next.
    ScramFinal(ScramState),
    /// Authenticated, or failed (the connection closes).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Scram(ScramHash),
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "PLAIN" => Some(Self::Plain),
            "SCRAM-SHA-256" => Some(Self::Scram(ScramHash::Sha256)),
            "SCRAM-SHA-512" => Some(Self::Scram(ScramHash::Sha512)),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct ScramState {
    hash: ScramHash,
    user: String,
    /// Whether the user exists; when not, the exchange runs on with made-up credentials and
    /// fails at the end, so a client cannot tell which users exist.
    known: bool,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

/// What one `SaslAuthenticate` message leads to.
pub enum Step {
    /// Send these bytes back; the exchange goes on.
    Continue(Vec<u8>),
    /// Authenticated as this user; send these bytes back (SCRAM's server signature).
    Authenticated { user: String, reply: Vec<u8> },
    /// Refused: the reason for the client, and the failure to count.
    Failed(String, AuthFailure),
}

fn failed(reason: &str, f: AuthFailure) -> Step {
    Step::Failed(reason.to_owned(), f)
}

/// PLAIN (RFC 4616): `authzid NUL authcid NUL password`, the password a token of `authcid`.
pub fn plain(security: &Security, message: &[u8]) -> Step {
    let mut parts = message.split(|b| *b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return failed("malformed PLAIN message", AuthFailure::BadToken);
    };
    let (Ok(authzid), Ok(user), Ok(password)) =
        (std::str::from_utf8(authzid), std::str::from_utf8(user), std::str::from_utf8(password))
    else {
        return failed("malformed PLAIN message", AuthFailure::BadToken);
    };
    if !authzid.is_empty() && authzid != user {
        return failed(
            "PLAIN: an authorization id other than the user is not supported",
            AuthFailure::BadToken,
        );
    }
    match security.authenticate_token(password) {
        Ok(owner) if owner == user => Step::Authenticated { user: owner, reply: Vec::new() },
        Ok(_) => failed("invalid credentials: the token belongs to another user", AuthFailure::BadToken),
        Err(f) => failed("invalid credentials", f),
    }
}

/// The value of attribute `name` (`name=value`) among a SCRAM message's comma-separated parts.
fn attr<'a>(parts: &[&'a str], name: char) -> Option<&'a str> {
    parts.iter().find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// A SCRAM user name, with `=2C` and `=3D` unescaped.
fn unescape(name: &str) -> String {
    name.replace("=2C", ",").replace("=3D", "=")
}

/// SCRAM's first message: `n,,n=user,r=nonce` (no channel binding). `server_nonce` is random
/// (printable, no comma).
pub fn scram_first(
    security: &Security,
    hash: ScramHash,
    message: &[u8],
    server_nonce: &str,
) -> Result<ScramState, Step> {
    let bad = || failed("malformed SCRAM client-first message", AuthFailure::BadToken);
    let text = std::str::from_utf8(message).map_err(|_| bad())?;
    // gs2 header: "n" or "y" (no channel binding), an optional authzid, then the bare message.
    let mut split = text.splitn(3, ',');
    let (Some(cb), Some(_authzid), Some(bare)) = (split.next(), split.next(), split.next()) else {
        return Err(bad());
    };
    if cb != "n" && cb != "y" {
        return Err(failed("SCRAM channel binding is not supported", AuthFailure::BadToken));
    }
    let parts: Vec<&str> = bare.split(',').collect();
    let (Some(user), Some(client_nonce)) = (attr(&parts, 'n'), attr(&parts, 'r')) else {
        return Err(bad());
    };
    if client_nonce.is_empty() {
        return Err(bad());
    }
    let user = unescape(user);
    let view = security.meta.view();
    let record = view.state.users.get(&user);
    let (salt, iterations, stored_key, server_key) = match record {
        Some(r) => {
            let s = r.scram(hash);
            (s.salt.clone(), s.iterations, s.stored_key.clone(), s.server_key.clone())
        }
        // Stable made-up credentials per user name: the same answer every time, so probing
        // cannot tell a missing user from a wrong token.
        None => {
            (hash.hash(format!("eddy-unknown-user:{user}").as_bytes())[..16].to_vec(), 4096, vec![], vec![])
        }
    };
    let nonce = format!("{client_nonce}{server_nonce}");
    let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
    Ok(ScramState {
        hash,
        known: record.is_some(),
        user,
        client_first_bare: bare.to_owned(),
        server_first,
        nonce,
        stored_key,
        server_key,
    })
}

impl ScramState {
    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// SCRAM's final message: `c=biws,r=nonce,p=proof`.
    pub fn finish(&self, message: &[u8]) -> Step {
        let bad = || failed("malformed SCRAM client-final message", AuthFailure::BadToken);
        let Ok(text) = std::str::from_utf8(message) else { return bad() };
        let Some((without_proof, proof)) = text.rsplit_once(",p=") else { return bad() };
        let parts: Vec<&str> = without_proof.split(',').collect();
        // Kafka's broker checks that the echoed nonce ends with its own, not that it equals it:
        // librdkafka puts its client nonce in front of the whole nonce once more. The proof
        // covers the message as sent either way.
        if !attr(&parts, 'r').is_some_and(|r| r.ends_with(self.nonce.as_str())) {
            return failed("SCRAM nonce mismatch", AuthFailure::BadToken);
        }
        let Ok(proof) = B64.decode(proof) else { return bad() };
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        if !self.known {
            return failed("invalid credentials", AuthFailure::UnknownUser);
        }
        let signature = self.hash.hmac(&self.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return failed("invalid credentials", AuthFailure::BadToken);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if !bool::from(self.hash.hash(&client_key).ct_eq(&self.stored_key)) {
            return failed("invalid credentials", AuthFailure::BadToken);
        }
        let server_signature = self.hash.hmac(&self.server_key, auth_message.as_bytes());
        Step::Authenticated {
            user: self.user.clone(),
            reply: format!("v={}", B64.encode(server_signature)).into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SCRAM client, as RFC 5802 describes one.
    fn client_final(
        hash: ScramHash,
        password: &str,
        client_first_bare: &str,
        server_first: &str,
    ) -> (String, Vec<u8>) {
        let parts: Vec<&str> = server_first.split(',').collect();
        let nonce = attr(&parts, 'r').expect("nonce");
        let salt = B64.decode(attr(&parts, 's').expect("salt")).expect("b64");
        let iterations: u32 = attr(&parts, 'i').expect("i").parse().expect("number");
        let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let stored_key = hash.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let server_key = hash.hmac(&salted, b"Server Key");
        let expected = format!("v={}", B64.encode(hash.hmac(&server_key, auth_message.as_bytes())));
        (format!("{without_proof},p={}", B64.encode(proof)), expected.into_bytes())
    }

    #[test]
    fn scram_state_machine_accepts_the_token_and_refuses_others() {
        let token = "alice.secret-secret";
        let record = crate::security::users::UserRecord::from_proto(&eddy_proto::credentials::credentials(
            token,
            &[[1; 16], [2; 16], [3; 16]],
        ))
        .expect("valid");
        for hash in [ScramHash::Sha256, ScramHash::Sha512] {
            let s = record.scram(hash);
            let state = ScramState {
                hash,
                user: "alice".into(),
                known: true,
                client_first_bare: "n=alice,r=abc".into(),
                server_first: format!("r=abcXYZ,s={},i={}", B64.encode(&s.salt), s.iterations),
                nonce: "abcXYZ".into(),
                stored_key: s.stored_key.clone(),
                server_key: s.server_key.clone(),
            };
            let (fin, expected) = client_final(hash, token, "n=alice,r=abc", state.server_first());
            match state.finish(fin.as_bytes()) {
                Step::Authenticated { user, reply } => {
                    assert_eq!(user, "alice");
                    assert_eq!(reply, expected, "the server proves it knows the credentials");
                }
                _ => panic!("{hash:?}: the right token is accepted"),
            }
            let (wrong, _) = client_final(hash, "alice.wrong", "n=alice,r=abc", state.server_first());
            assert!(matches!(state.finish(wrong.as_bytes()), Step::Failed(..)), "{hash:?}: a wrong token");
            assert!(matches!(state.finish(b"c=biws,r=other,p=AAAA"), Step::Failed(..)), "nonce mismatch");
            let (doubled, _) = client_final(hash, token, "n=alice,r=abc", state.server_first());
            let doubled = doubled.replacen("r=", "r=abc", 1);
            assert!(
                matches!(state.finish(doubled.as_bytes()), Step::Failed(..)),
                "a nonce ending with the server's is accepted, and the proof must then cover it"
            );
            assert!(matches!(state.finish(b"garbage"), Step::Failed(..)));
        }
    }
}
