//! A small certificate authority for people without a PKI (`eddyctl cert`, and `eddy-node dev`):
//! a CA, node certificates that name their node, and client certificates that name a user.
//!
//! A node certificate carries the URI SAN `urn:eddy:node:<id>` (how a node knows a peer, see
//! `eddy_node::security::tls`) and its hosts as DNS or IP SANs (how clients check they reached
//! the right address); it serves and it dials. A client certificate's common name is its user.
//! Keys are ECDSA P-256 (Ed25519 from a seed for the simulator, whose runs must repeat exactly:
//! see [`Ca::seeded`]). Certificates get rcgen's default validity (they do not expire in
//! practice); rotate by issuing new ones and restarting the nodes one at a time.

use anyhow::Context;
use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::DistinguishedName;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::Issuer;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;
use rcgen::SanType;

/// The URI SAN prefix of a node certificate.
pub const NODE_URI_PREFIX: &str = "urn:eddy:node:";

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// A CA that can sign.
pub struct Ca {
    pub issued: Issued,
    issuer: Issuer<'static, KeyPair>,
    keys: Keys,
}

/// Where a CA's keys come from.
enum Keys {
    /// The operating system's randomness: ECDSA P-256.
    Random,
    /// A seed: Ed25519 keys, the same for the same seed and order of issue. Not secret, only
    /// for the simulator, whose every run of a seed must send the same bytes.
    Seeded(std::sync::Mutex<u64>),
}

impl Keys {
    fn generate(&self) -> anyhow::Result<KeyPair> {
        let Self::Seeded(state) = self else {
            return KeyPair::generate().context("generate a key");
        };
        let mut state = state.lock().expect("key seed lock poisoned");
        // PKCS#8 v1 of an Ed25519 key: a fixed prefix, then the 32-byte seed (RFC 8410).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
        ];
        for _ in 0..4 {
            // SplitMix64.
            *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            der.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
        KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .context("an Ed25519 key from the seed")
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Eddy");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Self::with_keys(name, Keys::Random)
    }

    /// A CA whose keys, its own and those it issues, all come from `seed` (the simulator's).
    pub fn seeded(name: &str, seed: u64) -> anyhow::Result<Self> {
        Self::with_keys(name, Keys::Seeded(std::sync::Mutex::new(seed)))
    }

    fn with_keys(name: &str, keys: Keys) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = keys.generate().context("the CA key")?;
        let cert = params.self_signed(&key).context("sign the CA certificate")?;
        let issued = Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { issued, issuer: Issuer::new(params, key), keys })
    }

    /// The CA of a certificate and key made before (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a PEM private key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("the CA certificate is not a PEM certificate")?;
        Ok(Self {
            issued: Issued { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() },
            issuer,
            keys: Keys::Random,
        })
    }

    /// A certificate for node `id`, valid for `hosts` (DNS names or IP addresses).
    pub fn node(&self, id: u64, hosts: &[String]) -> anyhow::Result<Issued> {
        anyhow::ensure!(id >= 1, "a node id is at least 1");
        let mut sans = vec![SanType::URI(format!("{NODE_URI_PREFIX}{id}").try_into()?)];
        for h in hosts {
            sans.push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    h.clone().try_into().with_context(|| format!("{h:?} is not a host name"))?,
                ),
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        params.distinguished_name = dn(&format!("eddy-node-{id}"));
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// A client certificate for user `name`.
    pub fn client(&self, name: &str) -> anyhow::Result<Issued> {
        eddy_proto::credentials::validate_user_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> anyhow::Result<Issued> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = self.keys.generate()?;
        let cert = params.signed_by(&key, &self.issuer).context("sign the certificate")?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes a private key file readable by its owner only.
pub fn write_private(path: &std::path::Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(pem.as_bytes()).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_ca_signs_like_a_new_one() {
        let ca = Ca::new("test CA").expect("CA");
        let again = Ca::load(&ca.issued.cert_pem, &ca.issued.key_pem).expect("load");
        let n = again.node(3, &["127.0.0.1".into(), "node3.example".into()]).expect("node");
        assert!(n.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(again.client("bad name").is_err());
        assert!(again.node(0, &[]).is_err());
    }

    #[test]
    fn a_seeded_ca_issues_the_same_certificates_every_time() {
        let issue = |seed| {
            let ca = Ca::seeded("sim", seed).expect("CA");
            let node = ca.node(1, &["n1".into()]).expect("node");
            let client = ca.client("admin").expect("client");
            (ca.issued.cert_pem, node.cert_pem, node.key_pem, client.cert_pem)
        };
        assert_eq!(issue(7), issue(7), "the same seed, the same certificates and keys");
        assert_ne!(issue(7).2, issue(8).2, "another seed, other keys");
    }
}
