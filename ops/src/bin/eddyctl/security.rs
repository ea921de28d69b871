//! `eddyctl cert`, `user` and `acl`, and the credentials every command connects with (global
//! `--ca`, `--cert`, `--key`, `--token`, and a profile file holding them).

use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::admin::print_json;
use anyhow::Context;
use clap::Subcommand;
use eddy_ops::Client;
use eddy_ops::ClientConfig;
use eddy_ops::TlsOptions;
use eddy_ops::Token;
use eddy_ops::output::Format;
use eddy_ops::output::table;
use eddy_ops::pki;
use eddy_proto::v1 as pb;
use serde::Deserialize;
use serde_json::json;

/// A profile file (`--profile`, env `EDDY_PROFILE`): where the cluster is and who to be. Paths
/// are relative to the file. Command-line options and their environment variables win.
///
/// ```toml
/// brokers = ["127.0.0.1:9091"]
/// ca = "ca.pem"
/// cert = "admin.pem"
/// key = "admin.key"
/// token = "alice.…"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub brokers: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--profile: read {}", path.display()))?;
        let mut p: Self =
            toml::from_str(&text).with_context(|| format!("--profile: parse {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in [&mut p.ca, &mut p.cert, &mut p.key].into_iter().flatten() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(p)
    }
}

/// The credentials options, after the profile is merged in.
pub struct Credentials {
    pub brokers: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token: Option<String>,
}

impl Credentials {
    /// Fills in `config`'s TLS and token from these options.
    pub fn apply(&self, config: &mut ClientConfig) -> anyhow::Result<()> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p).with_context(|| format!("{what}: read {}", p.display()))
        };
        config.tls = match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => None,
            (None, _, _) => anyhow::bail!("--cert and --key need --ca (the cluster's CA certificate)"),
            (Some(ca), cert, key) => {
                let identity = match (cert, key) {
                    (Some(c), Some(k)) => Some((read(c, "--cert")?, read(k, "--key")?)),
                    (None, None) => None,
                    _ => anyhow::bail!("--cert and --key go together"),
                };
                Some(TlsOptions { ca_pem: read(ca, "--ca")?, identity })
            }
        };
        config.token = self.token.clone().map(Token);
        // Fails now, naming the option, if an address contradicts the TLS options.
        for b in &self.brokers {
            eddy_ops::client::broker_url(b, config.tls.is_some())?;
        }
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
#[allow(clippy::enum_variant_names)] // The commands are create-ca, create-node, create-client.
pub enum CertCommand {
    /// A new certificate authority: writes DIR/ca.pem and DIR/ca.key.
    CreateCa {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "Eddy CA")]
        name: String,
    },
    /// A node certificate signed by the CA: writes DIR/node-ID.pem and DIR/node-ID.key.
    CreateNode {
        id: u64,
        /// Host names and IP addresses clients and peers reach the node at (repeat).
        #[arg(long = "host", default_values_t = ["127.0.0.1".to_string(), "localhost".to_string()])]
        hosts: Vec<String>,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The CA certificate and key (default: DIR/ca.pem and DIR/ca.key).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        #[arg(long)]
        ca_key: Option<PathBuf>,
    },
    /// A client certificate for user NAME: writes DIR/NAME.pem and DIR/NAME.key.
    CreateClient {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        #[arg(long)]
        ca_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Creates a user and prints its token: the only time it is shown.
    Create {
        name: String,
        /// Give an existing user a new token (the old one stops working).
        #[arg(long)]
        rotate: bool,
    },
    Delete {
        name: String,
    },
    List,
    /// Who the cluster takes you for.
    Whoami,
}

#[derive(Subcommand, Debug)]
pub enum QuotaCommand {
    /// Sets a user's byte-rate quotas on every node (`*`: the default for users without their
    /// own); give neither rate to remove them.
    Set {
        #[arg(long)]
        user: String,
        /// Bytes per second the user may produce to each node (Kafka's producer_byte_rate).
        #[arg(long)]
        producer_byte_rate: Option<u64>,
        /// Bytes per second each node may serve the user (Kafka's consumer_byte_rate).
        #[arg(long)]
        consumer_byte_rate: Option<u64>,
    },
    List,
}

pub async fn quota(client: &Client, format: Format, command: QuotaCommand) -> anyhow::Result<ExitCode> {
    let rate = |r: Option<u64>| r.map_or_else(|| "-".to_owned(), |r| r.to_string());
    match command {
        QuotaCommand::Set { user, producer_byte_rate, consumer_byte_rate } => {
            client
                .set_quota(pb::Quota { user: user.clone(), producer_byte_rate, consumer_byte_rate })
                .await?;
            match format {
                Format::Json => print_json(
                    &json!({"user": user, "producer_byte_rate": producer_byte_rate, "consumer_byte_rate": consumer_byte_rate}),
                ),
                Format::Table => println!(
                    "quotas of {user}: produce {} B/s, fetch {} B/s",
                    rate(producer_byte_rate),
                    rate(consumer_byte_rate)
                ),
            }
        }
        QuotaCommand::List => {
            let quotas = client.list_quotas().await?;
            match format {
                Format::Json => print_json(
                    &json!({"quotas": quotas.iter().map(|q| json!({"user": q.user, "producer_byte_rate": q.producer_byte_rate, "consumer_byte_rate": q.consumer_byte_rate})).collect::<Vec<_>>()}),
                ),
                Format::Table => print!(
                    "{}",
                    table(
                        &["USER", "PRODUCER BYTE RATE", "CONSUMER BYTE RATE"],
                        quotas
                            .iter()
                            .map(|q| vec![
                                q.user.clone(),
                                rate(q.producer_byte_rate),
                                rate(q.consumer_byte_rate)
                            ])
                            .collect()
                    )
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("permission").required(true).args(["allow", "deny"])))]
#[command(group(clap::ArgGroup::new("resource").required(true).args(["topic", "group", "cluster"])))]
pub struct AclArgs {
    /// `User:NAME`, or `User:*` for every user.
    #[arg(long)]
    principal: String,
    #[arg(long)]
    allow: bool,
    #[arg(long)]
    deny: bool,
    /// read, write, create, delete, alter, describe or all.
    #[arg(long)]
    operation: String,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    cluster: bool,
    /// literal (the name) or prefixed (every name that starts with it).
    #[arg(long, default_value = "literal")]
    pattern: String,
}

impl AclArgs {
    fn binding(&self) -> pb::AclBinding {
        let (resource_type, resource) = match (&self.topic, &self.group) {
            (Some(t), _) => ("topic", t.clone()),
            (_, Some(g)) => ("group", g.clone()),
            _ => ("cluster", String::new()),
        };
        pb::AclBinding {
            principal: self.principal.clone(),
            resource_type: resource_type.into(),
            resource,
            pattern: self.pattern.clone(),
            operation: self.operation.clone(),
            permission: if self.deny { "deny" } else { "allow" }.into(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Adds a binding.
    Add(AclArgs),
    /// Removes a binding (the same options as add).
    Remove(AclArgs),
    /// Lists every binding.
    List,
}

fn ca_paths(dir: &Path, cert: Option<PathBuf>, key: Option<PathBuf>) -> (PathBuf, PathBuf) {
    (cert.unwrap_or_else(|| dir.join("ca.pem")), key.unwrap_or_else(|| dir.join("ca.key")))
}

fn load_ca(cert: &Path, key: &Path) -> anyhow::Result<pki::Ca> {
    let c = std::fs::read_to_string(cert)
        .with_context(|| format!("read the CA certificate {}", cert.display()))?;
    let k = std::fs::read_to_string(key).with_context(|| format!("read the CA key {}", key.display()))?;
    pki::Ca::load(&c, &k)
}

fn write_pair(dir: &Path, stem: &str, issued: &pki::Issued, format: Format) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    for p in [&cert, &key] {
        anyhow::ensure!(!p.exists(), "{} exists; remove it first (nothing was written)", p.display());
    }
    std::fs::write(&cert, &issued.cert_pem).with_context(|| format!("write {}", cert.display()))?;
    pki::write_private(&key, &issued.key_pem)?;
    match format {
        Format::Json => print_json(&json!({"cert": cert, "key": key})),
        Format::Table => println!("wrote {} and {}", cert.display(), key.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// `eddyctl cert`: needs no cluster.
pub fn cert(format: Format, command: CertCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertCommand::CreateCa { dir, name } => write_pair(&dir, "ca", &pki::Ca::new(&name)?.issued, format),
        CertCommand::CreateNode { id, hosts, dir, ca_cert, ca_key } => {
            let (c, k) = ca_paths(&dir, ca_cert, ca_key);
            write_pair(&dir, &format!("node-{id}"), &load_ca(&c, &k)?.node(id, &hosts)?, format)
        }
        CertCommand::CreateClient { name, dir, ca_cert, ca_key } => {
            let (c, k) = ca_paths(&dir, ca_cert, ca_key);
            write_pair(&dir, &name, &load_ca(&c, &k)?.client(&name)?, format)
        }
    }
}

pub async fn user(client: &Client, format: Format, command: UserCommand) -> anyhow::Result<ExitCode> {
    match command {
        UserCommand::Create { name, rotate } => {
            let token = client.create_user(&name, rotate).await?;
            match format {
                Format::Json => print_json(&json!({"user": name, "token": token.0})),
                Format::Table => {
                    println!("{}", token.0);
                    eprintln!(
                        "user {name} {}: the token above is shown only once",
                        if rotate { "has a new token" } else { "created" }
                    );
                }
            }
        }
        UserCommand::Delete { name } => {
            let deleted = client.delete_user(&name).await?;
            match format {
                Format::Json => print_json(&json!({"user": name, "deleted": deleted})),
                Format::Table if deleted => println!("user {name} deleted"),
                Format::Table => println!("no user {name}"),
            }
        }
        UserCommand::List => {
            let users = client.list_users().await?;
            match format {
                Format::Json => print_json(&json!({"users": users})),
                Format::Table => print!("{}", table(&["USER"], users.into_iter().map(|u| vec![u]).collect())),
            }
        }
        UserCommand::Whoami => {
            let w = client.who_am_i().await?;
            match format {
                Format::Json => print_json(&json!({
                    "principal": w.principal,
                    "superuser": w.superuser,
                    "authenticated_by": w.authenticated_by,
                })),
                Format::Table => println!(
                    "{} (by {}{})",
                    w.principal,
                    w.authenticated_by,
                    if w.superuser { ", superuser" } else { "" }
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn binding_json(b: &pb::AclBinding) -> serde_json::Value {
    json!({
        "principal": b.principal,
        "permission": b.permission,
        "operation": b.operation,
        "resource_type": b.resource_type,
        "resource": b.resource,
        "pattern": b.pattern,
    })
}

pub async fn acl(client: &Client, format: Format, command: AclCommand) -> anyhow::Result<ExitCode> {
    match command {
        AclCommand::Add(a) => {
            let b = a.binding();
            let added = client.add_acl(b.clone()).await?;
            match format {
                Format::Json => print_json(&json!({"binding": binding_json(&b), "added": added})),
                Format::Table if added => println!("added"),
                Format::Table => println!("the binding exists already"),
            }
        }
        AclCommand::Remove(a) => {
            let b = a.binding();
            let removed = client.remove_acl(b.clone()).await?;
            match format {
                Format::Json => print_json(&json!({"binding": binding_json(&b), "removed": removed})),
                Format::Table if removed => println!("removed"),
                Format::Table => println!("no such binding"),
            }
        }
        AclCommand::List => {
            let bindings = client.list_acls().await?;
            match format {
                Format::Json => {
                    print_json(&json!({"bindings": bindings.iter().map(binding_json).collect::<Vec<_>>()}))
                }
                Format::Table => {
                    let rows = bindings
                        .iter()
                        .map(|b| {
                            vec![
                                b.principal.clone(),
                                b.permission.clone(),
                                b.operation.clone(),
                                b.resource_type.clone(),
                                b.resource.clone(),
                                b.pattern.clone(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["PRINCIPAL", "PERMISSION", "OPERATION", "TYPE", "RESOURCE", "PATTERN"], rows)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
