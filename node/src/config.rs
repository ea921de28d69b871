//! The node's configuration file (TOML). Every field has a default and unknown keys are errors,
//! so a typo is reported instead of silently ignored.

use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use anyhow::bail;
use eddy_raft::NodeAddr;
use eddy_raft::NodeId;
use serde::Deserialize;
use serde::Serialize;

use crate::limits::Limits;
pub use crate::security::tls::TlsConfig;

/// Whether `addr` (`host:port`) names every interface (`0.0.0.0`, `[::]`).
fn is_wildcard(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_unspecified())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: NodeId,
    pub client_addr: String,
    pub raft_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster and never reused. Must be at least 1.
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// `eddy.v1.Broker` for clients and `eddyctl`: the address this node binds. Other nodes
    /// give clients [`NodeConfig::advertised_client_addr`], which defaults to it.
    pub client_addr: String,
    /// `eddy.v1.Raft`, between nodes (and UDP liveness probes): the address this node binds.
    pub raft_addr: String,
    /// The client address others reach this node at, when it differs from the one it binds
    /// (`0.0.0.0:9091`, a container's or NAT's inside address). Default: `client_addr`.
    pub advertised_client_addr: Option<String>,
    /// The Raft address peers reach this node at; default `raft_addr`.
    pub advertised_raft_addr: Option<String>,
    /// The Kafka address given to Kafka clients; default `kafka_addr`.
    pub advertised_kafka_addr: Option<String>,
    /// `/metrics` and `/health`.
    pub http_addr: String,
    /// The Kafka-protocol listener; off when absent. Other nodes give this address to Kafka
    /// clients (see `ARCHITECTURE.md`, "Kafka listener").
    pub kafka_addr: Option<String>,
    /// Where this node runs (a rack, zone or host group). Kafka clients that set `client.rack`
    /// are sent to a replica in their rack to read (KIP-392).
    pub rack: Option<String>,
    /// Create a topic when a Kafka client asks for its metadata and it does not exist (Kafka's
    /// `auto.create.topics.enable`; off by default, as in Redpanda: a typo in a producer's topic
    /// name should fail, not create a topic). It gets [`NodeConfig::default_partitions`] and
    /// [`NodeConfig::default_replication_factor`] and the broker's topic defaults.
    pub auto_create_topics: bool,
    /// Partitions of a topic created by auto-creation or by a Kafka `CreateTopics` that asks for
    /// the broker's default (-1): Kafka's `num.partitions`.
    pub default_partitions: u32,
    /// Replicas of such a topic, or as many as the cluster has nodes when it has fewer: Kafka's
    /// `default.replication.factor`.
    pub default_replication_factor: u32,
    /// The nodes that form a new cluster, this one included. Ignored once `data_dir` holds
    /// state. The member with the lowest id creates the metadata group.
    pub initial_members: Vec<MemberConfig>,
    /// Client addresses of existing nodes, for a node that joins a running cluster (instead of
    /// `initial_members`). Ignored once `data_dir` holds state.
    pub join: Vec<String>,
    /// Move partition leaderships back to their preferred replicas automatically (e.g. after a
    /// node returns). `eddyctl cluster balance` does it on demand either way.
    pub auto_balance_leaders: bool,
    /// A partition log starts a new segment file past this size (unless its topic sets
    /// `segment.bytes`).
    pub segment_bytes: u64,
    /// How often each partition leader checks its topic's `retention.ms` and `retention.bytes`.
    pub retention_check_interval_ms: u64,
    /// Most partition-log files (segments and state files of every replica here) kept open at
    /// once; others are opened when used and the least recently used are closed. 0 means half
    /// of the process's open-file limit (which the node raises to the hard limit at start).
    pub max_open_log_files: u64,
    /// Below this many bytes available on `data_dir`'s filesystem the node refuses writes (with
    /// the error `disk_full`) and hands its leaderships over, until space is freed (see
    /// `disk.rs`). The reserve keeps room for the metadata, state store and replication.
    pub storage_min_free_bytes: u64,
    /// TLS on every listener and between nodes (mutual TLS with node certificates); off when
    /// absent. See `ARCHITECTURE.md`, "Security".
    pub tls: Option<TlsConfig>,
    /// Which listeners require callers to authenticate (and then authorize them with ACLs).
    pub authentication: Authentication,
    /// Principals (`User:NAME`) that every ACL check lets through, as Kafka's `super.users`.
    pub superusers: Vec<String>,
    /// Connections each listener (client, Raft, Kafka, HTTP) keeps open at once; more are closed
    /// as soon as they are accepted.
    pub max_connections: usize,
    pub limits: Limits,
}

/// Per-listener authentication (see [`NodeConfig::authentication`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Authentication {
    /// `eddy.v1.Broker`, `Admin` and `Groups`: a bearer token or a client certificate.
    pub client: bool,
    /// The Kafka listener: SASL (PLAIN with a token as the password, SCRAM-SHA-256/512) or a
    /// client certificate.
    pub kafka: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            data_dir: PathBuf::from("./data/node"),
            client_addr: "127.0.0.1:9091".into(),
            raft_addr: "127.0.0.1:9191".into(),
            http_addr: "127.0.0.1:9291".into(),
            kafka_addr: None,
            advertised_client_addr: None,
            advertised_raft_addr: None,
            advertised_kafka_addr: None,
            rack: None,
            auto_create_topics: false,
            default_partitions: 1,
            default_replication_factor: 3,
            initial_members: Vec::new(),
            join: Vec::new(),
            auto_balance_leaders: true,
            segment_bytes: 64 << 20,
            retention_check_interval_ms: 5000,
            max_open_log_files: 0,
            storage_min_free_bytes: 64 << 20,
            tls: None,
            authentication: Authentication::default(),
            superusers: Vec::new(),
            max_connections: 10_000,
            limits: Limits::default(),
        }
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
        let c: Self =
            toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config always serializes")
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node_id == 0 {
            bail!("node_id: must be set to a number of at least 1");
        }
        for (name, addr) in [
            ("client_addr", &self.client_addr),
            ("raft_addr", &self.raft_addr),
            ("http_addr", &self.http_addr),
        ]
        .into_iter()
        .chain(self.kafka_addr.iter().map(|a| ("kafka_addr", a)))
        .chain(self.advertised_client_addr.iter().map(|a| ("advertised_client_addr", a)))
        .chain(self.advertised_raft_addr.iter().map(|a| ("advertised_raft_addr", a)))
        .chain(self.advertised_kafka_addr.iter().map(|a| ("advertised_kafka_addr", a)))
        {
            if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                bail!("{name}: {addr:?} is not a host:port address");
            }
        }
        if self.advertised_kafka_addr.is_some() && self.kafka_addr.is_none() {
            bail!("advertised_kafka_addr: set without kafka_addr (the Kafka listener is off)");
        }
        // A wildcard address is where a node listens, never where it can be reached.
        for (bind, advertised, name) in [
            (&self.client_addr, self.advertised_client(), "client_addr"),
            (&self.raft_addr, self.advertised_raft(), "raft_addr"),
        ]
        .into_iter()
        .chain(self.kafka_addr.as_ref().map(|k| (k, self.advertised_kafka().unwrap_or(k), "kafka_addr")))
        {
            if is_wildcard(advertised) {
                bail!(
                    "{name}: {bind} binds every interface, which is not an address other nodes and clients can reach; \
                     set advertised_{name} to the address they reach this node at"
                );
            }
        }
        if let Some(rack) = &self.rack {
            crate::limits::validate_rack(rack).map_err(|e| anyhow::anyhow!("rack: {e}"))?;
        }
        if !(1..=crate::limits::PARTITIONS_MAX).contains(&self.default_partitions) {
            bail!(
                "default_partitions: {} is out of range; a topic has 1 to {} partitions",
                self.default_partitions,
                crate::limits::PARTITIONS_MAX
            );
        }
        if !(1..=crate::limits::REPLICATION_FACTOR_MAX).contains(&self.default_replication_factor) {
            bail!(
                "default_replication_factor: {} is out of range; it must be 1 to {}",
                self.default_replication_factor,
                crate::limits::REPLICATION_FACTOR_MAX
            );
        }
        if !self.initial_members.is_empty() {
            let me = self.initial_members.iter().find(|m| m.id == self.node_id);
            let Some(me) = me else {
                bail!("initial_members: must include this node (node_id {})", self.node_id);
            };
            if me.client_addr != self.advertised_client() || me.raft_addr != self.advertised_raft() {
                bail!(
                    "initial_members: the entry for node {} must have the addresses this node advertises: {} and {} \
                     (advertised_client_addr and advertised_raft_addr, or client_addr and raft_addr)",
                    self.node_id,
                    self.advertised_client(),
                    self.advertised_raft()
                );
            }
            let mut ids: Vec<_> = self.initial_members.iter().map(|m| m.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != self.initial_members.len() || ids.contains(&0) {
                bail!("initial_members: ids must be distinct and at least 1");
            }
        }
        if !self.initial_members.is_empty() && !self.join.is_empty() {
            bail!("join: a node either forms a cluster (initial_members) or joins one (join), not both");
        }
        if self.segment_bytes < 1 << 20 {
            bail!("segment_bytes: {} is below the minimum of 1 MiB", self.segment_bytes);
        }
        if self.retention_check_interval_ms < 10 {
            bail!(
                "retention_check_interval_ms: {} is below the minimum of 10",
                self.retention_check_interval_ms
            );
        }
        for s in &self.superusers {
            let name = s
                .strip_prefix("User:")
                .ok_or_else(|| anyhow::anyhow!("superusers: {s:?} is not of the form User:NAME"))?;
            eddy_proto::credentials::validate_user_name(name)
                .map_err(|e| anyhow::anyhow!("superusers: {e}"))?;
        }
        if self.max_connections == 0 {
            bail!("max_connections: must be at least 1");
        }
        // Nodes prove who they are to each other by their certificates: without TLS a node's
        // calls to its peers' client listeners (status, leader balancing, joining) would have no
        // credentials, and tokens would cross in the clear.
        if self.tls.is_none() && self.authenticates() {
            bail!(
                "authentication is on but [tls] is not configured: nodes prove who they are to each other \
                 with certificates, and tokens must not cross the network in the clear. Configure [tls] \
                 (eddyctl cert create-ca, create-node), or turn [authentication] off"
            );
        }
        if self.limits.max_event_bytes == 0 || self.limits.max_event_bytes > self.limits.max_request_bytes {
            bail!("limits.max_event_bytes: must be between 1 and limits.max_request_bytes");
        }
        Ok(())
    }

    /// Whether any listener authenticates its callers.
    pub fn authenticates(&self) -> bool {
        self.authentication.client || self.authentication.kafka
    }

    /// The addresses other nodes and clients reach this node at.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            raft_addr: self.advertised_raft().to_owned(),
            client_addr: self.advertised_client().to_owned(),
        }
    }

    pub fn advertised_client(&self) -> &str {
        self.advertised_client_addr.as_deref().unwrap_or(&self.client_addr)
    }

    pub fn advertised_raft(&self) -> &str {
        self.advertised_raft_addr.as_deref().unwrap_or(&self.raft_addr)
    }

    /// The address Kafka clients are given; `None` without a Kafka listener.
    pub fn advertised_kafka(&self) -> Option<&str> {
        self.advertised_kafka_addr.as_deref().or(self.kafka_addr.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_and_rejects_typos() {
        let text = r#"
node_id = 1
data_dir = "/var/lib/eddy/1"
client_addr = "127.0.0.1:9091"
raft_addr   = "127.0.0.1:9191"
http_addr   = "127.0.0.1:9291"
[[initial_members]]
id = 1
client_addr = "127.0.0.1:9091"
raft_addr = "127.0.0.1:9191"
[[initial_members]]
id = 2
client_addr = "127.0.0.1:9092"
raft_addr = "127.0.0.1:9192"
"#;
        let c: NodeConfig = toml::from_str(text).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.initial_members.len(), 2);
        assert_eq!(c.limits, Limits::default());
        let round: NodeConfig = toml::from_str(&c.to_toml()).expect("round trip");
        assert_eq!(round, c);
        let typo = toml::from_str::<NodeConfig>("node_idd = 1");
        assert!(typo.is_err_and(|e| e.to_string().contains("node_idd")));
        assert_eq!(c.kafka_addr, None, "the Kafka listener is off unless configured");
        let with_kafka: NodeConfig =
            toml::from_str(&format!("kafka_addr = \"127.0.0.1:9391\"\n{text}")).expect("parses");
        assert_eq!(with_kafka.kafka_addr.as_deref(), Some("127.0.0.1:9391"));
        let bad = NodeConfig { kafka_addr: Some("nowhere".into()), ..c.clone() };
        assert!(bad.validate().is_err_and(|e| e.to_string().contains("kafka_addr")));
        let racked = NodeConfig { rack: Some("eu-west-1a".into()), ..c.clone() };
        racked.validate().expect("a rack name");
        for bad in ["", "rack a", &"r".repeat(65)] {
            let c = NodeConfig { rack: Some(bad.into()), ..c.clone() };
            assert!(c.validate().is_err_and(|e| e.to_string().starts_with("rack: ")), "{bad:?}");
        }
        assert!(!c.auto_create_topics, "Kafka topic auto-creation is off unless configured");
        for (bad, name) in [
            (NodeConfig { default_partitions: 0, ..c.clone() }, "default_partitions"),
            (NodeConfig { default_replication_factor: 0, ..c.clone() }, "default_replication_factor"),
            (NodeConfig { default_replication_factor: 99, ..c.clone() }, "default_replication_factor"),
        ] {
            assert!(bad.validate().is_err_and(|e| e.to_string().starts_with(name)), "{name}");
        }
        let secured = NodeConfig {
            authentication: Authentication { client: true, kafka: false },
            superusers: vec!["User:admin".into()],
            ..c.clone()
        };
        let e = secured.validate().expect_err("authentication without TLS, even on loopback");
        assert!(e.to_string().contains("[tls] is not configured"), "{e}");
        // Bound to every interface: only with the address to advertise.
        let wild = NodeConfig { client_addr: "0.0.0.0:9091".into(), ..c.clone() };
        let e = wild.validate().expect_err("a wildcard bind without an advertised address");
        assert!(e.to_string().contains("advertised_client_addr"), "{e}");
        let advertised = NodeConfig {
            client_addr: "0.0.0.0:9091".into(),
            raft_addr: "0.0.0.0:9191".into(),
            advertised_client_addr: Some(c.client_addr.clone()),
            advertised_raft_addr: Some(c.raft_addr.clone()),
            ..c.clone()
        };
        advertised.validate().expect("bound to 0.0.0.0, advertising the member addresses");
        assert_eq!(advertised.addr(), c.addr(), "others are given the advertised addresses");
        let elsewhere =
            NodeConfig { advertised_client_addr: Some("10.0.0.9:9091".into()), ..advertised.clone() };
        let e =
            elsewhere.validate().expect_err("an initial_members entry that is not what the node advertises");
        assert!(e.to_string().contains("10.0.0.9:9091"), "{e}");
        let kafka_off = NodeConfig { advertised_kafka_addr: Some("10.0.0.9:9391".into()), ..c.clone() };
        assert!(kafka_off.validate().is_err_and(|e| e.to_string().starts_with("advertised_kafka_addr")));
        let bad_super = NodeConfig { superusers: vec!["admin".into()], ..c.clone() };
        assert!(bad_super.validate().is_err_and(|e| e.to_string().starts_with("superusers")));
        let with_tls: NodeConfig = toml::from_str(&format!(
            "superusers = [\"User:admin\"]\n{text}\n[tls]\ncert = \"n.pem\"\nkey = \"n.key\"\nca = \"ca.pem\"\nrequire_client_cert = true\n[authentication]\nclient = true\nkafka = true\n"
        ))
        .expect("parses [tls] and [authentication]");
        assert!(with_tls.tls.as_ref().is_some_and(|t| t.require_client_cert));
        assert!(with_tls.authentication.kafka);
        let missing_me = NodeConfig { node_id: 3, ..c };
        assert!(missing_me.validate().is_err());
    }
}
