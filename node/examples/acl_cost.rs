//! The cost of one ACL decision at 1,000 bindings (issue 11's measurement):
//! `cargo run --release -p eddy-node --example acl_cost`.
//!
//! Bindings: 100 users with 10 each (literal and prefixed topics, groups, the cluster), plus
//! `User:*` ones. Timed: a decision for a user with 10 bindings (allowed, and refused after
//! looking at all of them), and for a principal that holds all 1,000 itself (the worst case:
//! the index groups bindings by principal and resource type, and scans those).

#![allow(clippy::disallowed_methods)] // A benchmark measures real time.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use eddy_node::security::acl::AclBinding;
use eddy_node::security::acl::AclIndex;
use eddy_node::security::acl::Operation;
use eddy_node::security::acl::ResourceType;

fn binding(principal: &str, rt: &str, res: &str, pattern: &str, op: &str, perm: &str) -> AclBinding {
    AclBinding::from_proto(&eddy_proto::v1::AclBinding {
        principal: principal.into(),
        resource_type: rt.into(),
        resource: res.into(),
        pattern: pattern.into(),
        operation: op.into(),
        permission: perm.into(),
    })
    .expect("valid")
}

fn time(what: &str, idx: &AclIndex, user: &str, op: Operation, rt: ResourceType, name: &str) {
    const N: u32 = 1_000_000;
    let start = Instant::now();
    let mut allowed = 0u32;
    for _ in 0..N {
        allowed += u32::from(idx.allows(black_box(user), op, rt, black_box(name)));
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
    println!("{what:60} {ns:8.1} ns per decision (allowed: {})", allowed == N);
}

fn main() {
    let mut set = BTreeSet::new();
    for u in 0..100 {
        let p = format!("User:user{u}");
        for t in 0..4 {
            set.insert(binding(&p, "topic", &format!("team{u}.topic{t}"), "literal", "write", "allow"));
        }
        set.insert(binding(&p, "topic", &format!("team{u}."), "prefixed", "read", "allow"));
        set.insert(binding(&p, "topic", &format!("team{u}.secret"), "literal", "all", "deny"));
        set.insert(binding(&p, "group", &format!("team{u}-"), "prefixed", "read", "allow"));
        set.insert(binding(&p, "group", &format!("team{u}-admin"), "literal", "delete", "allow"));
        set.insert(binding(&p, "cluster", "", "literal", "describe", "allow"));
        set.insert(binding(&p, "topic", &format!("shared{u}"), "literal", "describe", "allow"));
    }
    for t in 0..10 {
        set.insert(binding("User:*", "topic", &format!("public{t}"), "literal", "read", "allow"));
    }
    let mut heavy = BTreeSet::new();
    for t in 0..1000 {
        heavy.insert(binding("User:heavy", "topic", &format!("topic{t:04}."), "prefixed", "write", "allow"));
    }
    println!("{} bindings (100 users x 10, 10 for User:*); and 1,000 for one user", set.len());
    let idx = AclIndex::new(&set);
    time(
        "user with 10 bindings, write allowed by a literal",
        &idx,
        "user42",
        Operation::Write,
        ResourceType::Topic,
        "team42.topic3",
    );
    time(
        "user with 10 bindings, read allowed by a prefix",
        &idx,
        "user42",
        Operation::Read,
        ResourceType::Topic,
        "team42.orders",
    );
    time(
        "user with 10 bindings, refused (nothing matches)",
        &idx,
        "user42",
        Operation::Write,
        ResourceType::Topic,
        "payments",
    );
    let idx = AclIndex::new(&heavy);
    time(
        "user with 1,000 prefixed bindings, allowed by the last",
        &idx,
        "heavy",
        Operation::Write,
        ResourceType::Topic,
        "topic0999.x",
    );
    time(
        "user with 1,000 prefixed bindings, refused",
        &idx,
        "heavy",
        Operation::Write,
        ResourceType::Topic,
        "other",
    );
}
