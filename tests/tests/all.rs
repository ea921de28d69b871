//! Every multi-process test in one test binary (one link instead of one per file, and one
//! libtest run): its tests run two at a time, and the clusters they start one at a time
//! (`eddy_tests::Cluster`), so one test's preparation (building librdkafka's test runner or an
//! earlier revision's node, installing a Python client) overlaps another's cluster. Each module
//! is one file beside this one; `cargo test -p eddy-tests --test all MODULE::` runs one.

#![allow(clippy::disallowed_methods)] // Tests measure real time.

mod acl_matrix;
mod consumer_groups;
mod disk_full;
mod kafka;
mod kafka_clients;
#[path = "support/kafka_conn.rs"]
mod kafka_conn;
mod kcat;
mod librdkafka;
mod netns;
mod operations;
mod replicated_log;
mod retention;
mod security;
mod upgrade;
