//! Who may talk to a node and what they may do: TLS and identities ([`tls`]), users
//! ([`users`]), Kafka's ACL model ([`acl`]), the decision for every RPC and Kafka API
//! ([`rules`]), and the gRPC layer that authenticates each request ([`layer`]).
//!
//! Every request of a listener that authenticates gets a [`Caller`]: its principal, and the ACL
//! bindings in force when it arrived. A listener that does not authenticate gives every request
//! an unrestricted caller (the behaviour of a cluster without security configured).

pub mod acl;
pub mod layer;
pub mod quota;
pub mod rules;
pub mod tls;
pub mod users;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use eddy_proto::v1::NodeIds;
use eddy_proto::v1::raft_client::RaftClient;
use eddy_raft::NodeId;
use eddy_raft::transport::Peers;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tracing::info;

use crate::error::BrokerError;
use crate::meta::MetaHandle;
use crate::meta::state::NodeState;
use crate::metrics::NodeMetrics;
use acl::AclBinding;
use acl::AclIndex;
use acl::Operation;
use acl::Principal;
use acl::ResourceType;

/// How often this node asks the members it knows about one node its metadata does not list.
pub const VOUCH_RETRY: Duration = Duration::from_secs(1);
/// Deadline of one such question.
pub const VOUCH_TIMEOUT: Duration = Duration::from_millis(500);
/// An unlisted node that has not called for this long is no longer asked about.
pub const UNLISTED_FORGET: Duration = Duration::from_secs(10);

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    None,
    Token,
    Certificate,
    Sasl,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Token => "token",
            Self::Certificate => "certificate",
            Self::Sasl => "sasl",
        }
    }
}

/// Why authentication failed, as counted in `eddy_auth_failures` (never with the credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    NoCredentials,
    BadToken,
    UnknownUser,
    NotANode,
    NodeNotMember,
    NodeAsUser,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::BadToken => "bad_token",
            Self::UnknownUser => "unknown_user",
            Self::NotANode => "not_a_node",
            Self::NodeNotMember => "node_not_member",
            Self::NodeAsUser => "node_as_user",
        }
    }
}

/// A node's security settings and the state its decisions read.
pub struct Security {
    pub me: NodeId,
    pub meta: MetaHandle,
    /// Principals (`User:NAME`) that bypass authorization.
    pub superusers: BTreeSet<String>,
    /// The nodes named in `initial_members`: members before the metadata records any.
    pub initial_members: BTreeSet<NodeId>,
    pub metrics: Arc<NodeMetrics>,
    /// The index of the last ACL bindings seen; rebuilt when the bindings change.
    acls: Mutex<(Arc<BTreeSet<AclBinding>>, Arc<AclIndex>)>,
    /// This node's byte-rate meters.
    pub quotas: quota::Quotas,
    /// Nodes this node's metadata does not list yet that a member it knows counts as members
    /// (see [`Security::vouch`]).
    vouched: Mutex<BTreeSet<NodeId>>,
    /// Unlisted nodes that called, to ask the members about: when each last called, and when
    /// the members were last asked about it.
    unlisted: Mutex<BTreeMap<NodeId, (Instant, Option<Instant>)>>,
    unlisted_added: Notify,
    /// Bugs the simulator planted.
    #[cfg(feature = "planted-bugs")]
    pub bugs: crate::env::PlantedBugs,
}

impl Security {
    pub fn new(
        me: NodeId,
        meta: MetaHandle,
        superusers: BTreeSet<String>,
        initial_members: BTreeSet<NodeId>,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            me,
            meta,
            superusers,
            initial_members,
            metrics,
            acls: Mutex::default(),
            vouched: Mutex::default(),
            unlisted: Mutex::default(),
            unlisted_added: Notify::new(),
            quotas: Default::default(),
            #[cfg(feature = "planted-bugs")]
            bugs: Default::default(),
        }
    }

    /// The ACL bindings in force, indexed.
    pub fn acl_index(&self) -> Arc<AclIndex> {
        let view = self.meta.view();
        let mut cached = self.acls.lock().expect("acl cache lock poisoned");
        // The cache holds a reference to the bindings it indexed, so a change to them always
        // makes a new set (copy on write), and pointer equality means "unchanged".
        if !Arc::ptr_eq(&cached.0, &view.state.acls) {
            *cached = (view.state.acls.clone(), Arc::new(AclIndex::new(&view.state.acls)));
        }
        cached.1.clone()
    }

    /// The quota of `principal` (its own, or the default user's); `None` for non-users and
    /// users without one.
    pub fn quota_of(&self, principal: &Principal) -> Option<(String, quota::UserQuota)> {
        let Principal::User(user) = principal else { return None };
        let view = self.meta.view();
        let q =
            view.state.quotas.get(user).or_else(|| view.state.quotas.get(quota::DEFAULT_USER)).copied()?;
        Some((user.clone(), q))
    }

    /// Waits until `principal` may send a request of `bytes` in direction `d`, and charges it:
    /// at most [`quota::HOLD_MAX`]; then `Err` with how much longer it would have to wait.
    pub async fn admit(
        &self,
        principal: &Principal,
        d: quota::Direction,
        bytes: u64,
    ) -> Result<(), std::time::Duration> {
        let Some((user, q)) = self.quota_of(principal) else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + quota::HOLD_MAX;
        loop {
            match self.quotas.admit(&user, d, bytes, Some(q)) {
                Ok(()) => return Ok(()),
                Err(wait) if tokio::time::Instant::now() + wait <= deadline => tokio::time::sleep(wait).await,
                Err(wait) => return Err(wait),
            }
        }
    }

    /// Charges `bytes` served to (or taken from) `principal` and returns what it owes now.
    pub fn charge(&self, principal: &Principal, d: quota::Direction, bytes: u64) -> std::time::Duration {
        let Some((user, q)) = self.quota_of(principal) else { return std::time::Duration::ZERO };
        self.quotas.charge(&user, d, bytes, Some(q))
    }

    /// The user a bearer token (or SASL/PLAIN password) belongs to.
    pub fn authenticate_token(&self, token: &str) -> Result<String, AuthFailure> {
        let user = eddy_proto::credentials::token_user(token).ok_or(AuthFailure::BadToken)?;
        let view = self.meta.view();
        let record = view.state.users.get(user).ok_or(AuthFailure::UnknownUser)?;
        #[cfg(feature = "planted-bugs")]
        if self.bugs.tokens_unchecked {
            return Ok(user.to_owned());
        }
        if record.verify_token(token) { Ok(user.to_owned()) } else { Err(AuthFailure::BadToken) }
    }

    /// Whether node `id` may speak Raft to this one: a member that has not been removed. Before
    /// this node's metadata records any node: one of `initial_members` when it forms the cluster,
    /// and any node the CA vouched for when it joins one (it holds nothing yet, and learns the
    /// members from the metadata the leader sends it). A node the metadata does not list yet
    /// may have joined while this node's metadata lagged (it was away, or its disk was full),
    /// and may even lead the metadata group, which alone can bring this node up to date: it is
    /// let in once a member this node knows counts it as a member (see [`Security::vouch`]).
    pub fn node_is_member(&self, id: NodeId) -> bool {
        let view = self.meta.view();
        match view.state.nodes.get(&id) {
            Some(n) => n.state != NodeState::Removed,
            None if view.state.nodes.is_empty() => {
                self.initial_members.is_empty() || self.initial_members.contains(&id)
            }
            None => {
                if self.vouched.lock().expect("vouched lock poisoned").contains(&id) {
                    return true;
                }
                let mut unlisted = self.unlisted.lock().expect("unlisted lock poisoned");
                let asked = unlisted.get(&id).and_then(|(_, asked)| *asked);
                if unlisted.insert(id, (Instant::now(), asked)).is_none() {
                    self.unlisted_added.notify_one();
                }
                false
            }
        }
    }

    /// Asks the members this node knows about the nodes that called it without being listed
    /// in its metadata (see [`Security::node_is_member`]), each at most once per
    /// [`VOUCH_RETRY`], until `cancel` fires. A node one of them counts as a member is let in.
    pub async fn vouch(self: Arc<Self>, peers: Arc<Peers>, cancel: CancellationToken) {
        loop {
            let due: Vec<NodeId> = {
                let now = Instant::now();
                let mut unlisted = self.unlisted.lock().expect("unlisted lock poisoned");
                let view = self.meta.view();
                // A node that stopped calling is forgotten (a stray or refused one does not keep
                // this task asking), and so is one the metadata now lists.
                unlisted.retain(|id, (called, _)| {
                    !view.state.nodes.contains_key(id) && now < *called + UNLISTED_FORGET
                });
                let due: Vec<NodeId> = unlisted
                    .iter()
                    .filter(|(_, (_, asked))| asked.is_none_or(|at| now >= at + VOUCH_RETRY))
                    .map(|(id, _)| *id)
                    .collect();
                for id in &due {
                    if let Some((_, asked)) = unlisted.get_mut(id) {
                        *asked = Some(now);
                    }
                }
                due
            };
            if !due.is_empty() {
                let vouched = self.ask_members(&peers, due).await;
                if !vouched.is_empty() {
                    let mut unlisted = self.unlisted.lock().expect("unlisted lock poisoned");
                    for id in &vouched {
                        unlisted.remove(id);
                    }
                    self.vouched.lock().expect("vouched lock poisoned").extend(vouched);
                }
            }
            // Nodes still unlisted are asked about again after a while; with none, only a new
            // one wakes this task.
            let waiting = !self.unlisted.lock().expect("unlisted lock poisoned").is_empty();
            tokio::select! {
                // Each arm only waits.
                _ = cancel.cancelled() => break,
                _ = self.unlisted_added.notified() => {}
                _ = tokio::time::sleep(VOUCH_RETRY), if waiting => {}
            }
        }
    }

    /// The nodes of `ids` that a member this node knows counts as members; asks one member at a
    /// time, each with a deadline, until every id is vouched for or every member was asked.
    async fn ask_members(&self, peers: &Peers, mut ids: Vec<NodeId>) -> Vec<NodeId> {
        let members: Vec<(NodeId, String)> = {
            let view = self.meta.view();
            view.state
                .nodes
                .iter()
                .filter(|(id, n)| **id != self.me && n.state != NodeState::Removed)
                .map(|(id, n)| (*id, n.addr.raft_addr.clone()))
                .collect()
        };
        let mut vouched = Vec::new();
        for (member, addr) in members {
            if ids.is_empty() {
                break;
            }
            let mut client = RaftClient::new(peers.channel(member, &addr));
            let mut request = tonic::Request::new(NodeIds { ids: ids.clone() });
            request.set_timeout(VOUCH_TIMEOUT);
            match tokio::time::timeout(VOUCH_TIMEOUT, client.members(request)).await {
                Ok(Ok(reply)) => {
                    let yes: BTreeSet<NodeId> = reply.into_inner().ids.into_iter().collect();
                    for id in ids.iter().filter(|id| yes.contains(id)) {
                        info!(
                            node = id,
                            by = member,
                            "a node this node's metadata does not list yet is a member: letting it in"
                        );
                        vouched.push(*id);
                    }
                    ids.retain(|id| !yes.contains(id));
                }
                Ok(Err(status)) => debug!(member, "asking about unlisted nodes failed: {}", status.message()),
                Err(_) => debug!(member, "asking about unlisted nodes timed out"),
            }
        }
        vouched
    }

    /// A caller for `principal` on `listener`, whose requests are authorized when `enforce`.
    pub fn caller(
        &self,
        principal: Principal,
        via: AuthMethod,
        enforce: bool,
        listener: &'static str,
    ) -> Caller {
        let superuser =
            matches!(&principal, Principal::User(_)) && self.superusers.contains(&principal.to_string());
        Caller {
            principal,
            via,
            superuser,
            enforce,
            acls: if enforce && !superuser { self.acl_index() } else { Arc::default() },
            listener,
            metrics: Some(self.metrics.clone()),
        }
    }
}

/// Who made a request, and what the ACLs let them do.
#[derive(Clone)]
pub struct Caller {
    pub principal: Principal,
    pub via: AuthMethod,
    pub superuser: bool,
    /// False on a listener that does not authenticate: everything is allowed.
    enforce: bool,
    acls: Arc<AclIndex>,
    listener: &'static str,
    metrics: Option<Arc<NodeMetrics>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("principal", &self.principal)
            .field("superuser", &self.superuser)
            .finish()
    }
}

impl Caller {
    /// A caller allowed everything (a listener without authentication; internal work).
    pub fn unrestricted() -> Self {
        Self {
            principal: Principal::Anonymous,
            via: AuthMethod::None,
            superuser: false,
            enforce: false,
            acls: Arc::default(),
            listener: "internal",
            metrics: None,
        }
    }

    /// Whether authorization applies to this caller at all.
    pub fn restricted(&self) -> bool {
        self.enforce && !self.superuser
    }

    /// Whether the caller may do `op` on the resource (`name` is ignored for the cluster).
    pub fn allows(&self, op: Operation, resource_type: ResourceType, name: &str) -> bool {
        if !self.restricted() {
            return true;
        }
        match &self.principal {
            Principal::User(u) => self.acls.allows(u, op, resource_type, name),
            Principal::Node(_) | Principal::Anonymous => false,
        }
    }

    /// [`Caller::allows`], or an error that names the principal, the operation and the resource.
    pub fn check(&self, op: Operation, resource_type: ResourceType, name: &str) -> Result<(), BrokerError> {
        if self.allows(op, resource_type, name) {
            return Ok(());
        }
        if let Some(m) = &self.metrics {
            m.authorization_denied(self.listener);
        }
        let what = match resource_type {
            ResourceType::Cluster => "the cluster".to_owned(),
            _ => format!("{resource_type} \"{name}\""),
        };
        Err(BrokerError::PermissionDenied(format!("{} may not {op} {what}", self.principal)))
    }

    /// The caller of a gRPC request, as [`layer::AuthLayer`] left it. A request without one
    /// (a server built without the layer) is refused: authorization fails closed.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Self, tonic::Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| tonic::Status::internal("the request passed no authentication layer"))
    }
}
