//! A small certificate authority for people without a PKI (`eddyctl cert`, and `eddy-node dev`):
//! a CA, node certificates that name their node, and client certificates that name a user.
//!
//! A node certificate carries the URI SAN `urn:eddy:node:<id>` (how a node knows a peer, see
//! `eddy_node::security::tls`) and its hosts as DNS or IP SANs (how clients check they reached
//! the right address); it serves and it dials. A client certificate's common name is its user.
//! Keys are ECDSA P-256. Certificates get rcgen's default validity (they do not expire in
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
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("generate the CA key")?;
        let cert = params.self_signed(&key).context("sign the CA certificate")?;
        let issued = Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { issued, issuer: Issuer::new(params, key) })
    }

    /// The CA of a certificate and key made before (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a PEM private key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("the CA certificate is not a PEM certificate")?;
        Ok(Self { issued: Issued { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() }, issuer })
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
        let key = KeyPair::generate().context("generate a key")?;
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
}
