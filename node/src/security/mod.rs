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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;

use eddy_raft::NodeId;

use crate::error::BrokerError;
use crate::meta::MetaHandle;
use crate::meta::state::NodeState;
use crate::metrics::NodeMetrics;
use acl::AclBinding;
use acl::AclIndex;
use acl::Operation;
use acl::Principal;
use acl::ResourceType;

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
    /// members from the metadata the leader sends it).
    pub fn node_is_member(&self, id: NodeId) -> bool {
        let view = self.meta.view();
        match view.state.nodes.get(&id) {
            Some(n) => n.state != NodeState::Removed,
            None => {
                view.state.nodes.is_empty()
                    && (self.initial_members.is_empty() || self.initial_members.contains(&id))
            }
        }
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
