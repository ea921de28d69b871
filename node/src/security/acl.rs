//! Kafka's authorization model: who ([`Principal`]) may do what ([`Operation`]) to which
//! resource ([`ResourceType`] and a name or prefix), as [`AclBinding`]s replicated in the
//! metadata group, and the decision over them ([`AclIndex::allows`]).
//!
//! Deny wins over allow; an allow of read, write, delete or alter also allows describe; with no
//! matching allow the answer is no. `User:*` matches every user, and a literal name `*` every
//! resource of its type. Superusers never reach this code (see `security::Caller`).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde::Serialize;

use eddy_raft::NodeId;

/// The longest topic or group name or prefix a binding names.
const RESOURCE_NAME_MAX: usize = 255;

/// Whom a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Principal {
    /// A user: by token (SASL or bearer) or by client certificate.
    User(String),
    /// Another node of this cluster, by its node certificate.
    Node(NodeId),
    /// Nobody: a listener that authenticates no one (and then authorizes everything).
    Anonymous,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(u) => write!(f, "User:{u}"),
            Self::Node(n) => write!(f, "Node:{n}"),
            Self::Anonymous => f.write_str("User:ANONYMOUS"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceType {
    Topic,
    Group,
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pattern {
    Literal,
    Prefixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    Allow,
    Deny,
}

macro_rules! names {
    ($ty:ty, $what:literal, $($v:ident = $s:literal),+) => {
        impl $ty {
            pub const ALL: &[$ty] = &[$(<$ty>::$v),+];
            pub fn as_str(self) -> &'static str {
                match self { $(<$ty>::$v => $s),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($s => Ok(<$ty>::$v),)+
                    _ => Err(format!(
                        concat!("{:?} is not a ", $what, "; one of: {}"),
                        s,
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

names!(ResourceType, "resource type", Topic = "topic", Group = "group", Cluster = "cluster");
names!(Pattern, "pattern type", Literal = "literal", Prefixed = "prefixed");
names!(
    Operation,
    "operation",
    All = "all",
    Read = "read",
    Write = "write",
    Create = "create",
    Delete = "delete",
    Alter = "alter",
    Describe = "describe"
);
names!(Permission, "permission", Allow = "allow", Deny = "deny");

/// One binding. Ordered, so that the set of bindings (and its listing) has one order everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    /// `User:NAME` or `User:*`.
    pub principal: String,
    pub resource_type: ResourceType,
    /// The name or prefix; empty for the cluster.
    pub resource: String,
    pub pattern: Pattern,
    pub operation: Operation,
    pub permission: Permission,
}

impl AclBinding {
    /// Parses and checks a binding as the API carries it; the error names the field.
    pub fn from_proto(b: &eddy_proto::v1::AclBinding) -> Result<Self, String> {
        let field = |name: &str, v: &str, e: String| format!("{name}: {e} (got {v:?})");
        let resource_type: ResourceType =
            b.resource_type.parse().map_err(|e| field("resource_type", &b.resource_type, e))?;
        let pattern: Pattern = if b.pattern.is_empty() {
            Pattern::Literal
        } else {
            b.pattern.parse().map_err(|e| field("pattern", &b.pattern, e))?
        };
        let operation: Operation = b.operation.parse().map_err(|e| field("operation", &b.operation, e))?;
        let permission: Permission =
            b.permission.parse().map_err(|e| field("permission", &b.permission, e))?;
        let Some(user) = b.principal.strip_prefix("User:") else {
            return Err(format!("principal: {:?} is not of the form User:NAME or User:*", b.principal));
        };
        if user != "*" {
            eddy_proto::credentials::validate_user_name(user).map_err(|e| format!("principal: {e}"))?;
        }
        match resource_type {
            ResourceType::Cluster if !b.resource.is_empty() && b.resource != "kafka-cluster" => {
                return Err("resource: the cluster resource has no name".into());
            }
            ResourceType::Cluster if pattern != Pattern::Literal => {
                return Err("pattern: the cluster resource is literal".into());
            }
            ResourceType::Topic | ResourceType::Group
                if b.resource.is_empty() || b.resource.len() > RESOURCE_NAME_MAX =>
            {
                return Err(format!(
                    "resource: a {resource_type} binding names 1 to {RESOURCE_NAME_MAX} bytes of name or prefix"
                ));
            }
            _ => {}
        }
        let resource =
            if resource_type == ResourceType::Cluster { String::new() } else { b.resource.clone() };
        Ok(Self { principal: b.principal.clone(), resource_type, resource, pattern, operation, permission })
    }

    pub fn to_proto(&self) -> eddy_proto::v1::AclBinding {
        eddy_proto::v1::AclBinding {
            principal: self.principal.clone(),
            resource_type: self.resource_type.to_string(),
            resource: self.resource.clone(),
            pattern: self.pattern.to_string(),
            operation: self.operation.to_string(),
            permission: self.permission.to_string(),
        }
    }

    fn matches_name(&self, name: &str) -> bool {
        match self.pattern {
            _ if self.resource_type == ResourceType::Cluster => true,
            Pattern::Literal => self.resource == name || self.resource == "*",
            Pattern::Prefixed => name.starts_with(&self.resource),
        }
    }

    /// Whether this binding's operation covers `op` for an allow (with describe implied) or a
    /// deny (exact, or all).
    fn covers(&self, op: Operation) -> bool {
        self.operation == Operation::All
            || self.operation == op
            || (self.permission == Permission::Allow
                && op == Operation::Describe
                && matches!(
                    self.operation,
                    Operation::Read | Operation::Write | Operation::Delete | Operation::Alter
                ))
    }
}

/// The bindings grouped by principal and resource type, so a decision looks only at the
/// bindings of its principal (and of `User:*`) for its resource type.
#[derive(Debug, Default)]
pub struct AclIndex {
    by_principal: BTreeMap<(String, ResourceType), Vec<AclBinding>>,
}

impl AclIndex {
    pub fn new(bindings: &BTreeSet<AclBinding>) -> Self {
        let mut by_principal: BTreeMap<(String, ResourceType), Vec<AclBinding>> = BTreeMap::new();
        for b in bindings {
            by_principal.entry((b.principal.clone(), b.resource_type)).or_default().push(b.clone());
        }
        Self { by_principal }
    }

    /// Whether `user` (a user name) may do `op` on the resource.
    pub fn allows(&self, user: &str, op: Operation, resource_type: ResourceType, name: &str) -> bool {
        let mut allowed = false;
        for principal in [format!("User:{user}"), "User:*".to_owned()] {
            let Some(bindings) = self.by_principal.get(&(principal, resource_type)) else { continue };
            for b in bindings.iter().filter(|b| b.covers(op) && b.matches_name(name)) {
                match b.permission {
                    Permission::Deny => return false,
                    Permission::Allow => allowed = true,
                }
            }
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        principal: &str,
        rt: &str,
        res: &str,
        pat: &str,
        op: &str,
        perm: &str,
    ) -> Result<AclBinding, String> {
        AclBinding::from_proto(&eddy_proto::v1::AclBinding {
            principal: principal.into(),
            resource_type: rt.into(),
            resource: res.into(),
            pattern: pat.into(),
            operation: op.into(),
            permission: perm.into(),
        })
    }

    fn bind(principal: &str, rt: &str, res: &str, pat: &str, op: &str, perm: &str) -> AclBinding {
        parse(principal, rt, res, pat, op, perm).expect("valid binding")
    }

    #[test]
    fn deny_wins_describe_is_implied_and_nothing_is_allowed_by_default() {
        let set: BTreeSet<AclBinding> = [
            bind("User:alice", "topic", "orders.", "prefixed", "write", "allow"),
            bind("User:alice", "topic", "orders.secret", "literal", "all", "deny"),
            bind("User:*", "group", "*", "literal", "read", "allow"),
            bind("User:bob", "cluster", "", "literal", "alter", "allow"),
        ]
        .into();
        let idx = AclIndex::new(&set);
        use Operation::*;
        use ResourceType::*;
        assert!(idx.allows("alice", Write, Topic, "orders.eu"));
        assert!(idx.allows("alice", Describe, Topic, "orders.eu"), "write implies describe");
        assert!(!idx.allows("alice", Read, Topic, "orders.eu"));
        assert!(!idx.allows("alice", Write, Topic, "payments"));
        assert!(!idx.allows("alice", Write, Topic, "orders.secret"), "deny wins");
        assert!(!idx.allows("alice", Describe, Topic, "orders.secret"), "deny all covers describe");
        assert!(idx.allows("carol", Read, Group, "anything"), "User:* and the literal wildcard");
        assert!(!idx.allows("carol", Delete, Group, "anything"));
        assert!(idx.allows("bob", Alter, Cluster, ""));
        assert!(idx.allows("bob", Describe, Cluster, ""));
        assert!(!idx.allows("alice", Alter, Cluster, ""));
        assert!(!AclIndex::default().allows("alice", Describe, Topic, "t"), "deny by default");
    }

    #[test]
    fn bad_bindings_name_the_field() {
        let b = parse;
        for (r, field) in [
            (b("alice", "topic", "t", "", "read", "allow"), "principal"),
            (b("User:alice", "table", "t", "", "read", "allow"), "resource_type"),
            (b("User:alice", "topic", "t", "glob", "read", "allow"), "pattern"),
            (b("User:alice", "topic", "t", "", "fly", "allow"), "operation"),
            (b("User:alice", "topic", "t", "", "read", "maybe"), "permission"),
            (b("User:alice", "topic", "", "", "read", "allow"), "resource"),
            (b("User:alice", "cluster", "", "prefixed", "read", "allow"), "pattern"),
        ] {
            let e = r.expect_err(field);
            assert!(e.starts_with(field), "{e}");
        }
    }
}
