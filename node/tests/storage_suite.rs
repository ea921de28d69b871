//! openraft's own storage test suite, run against Eddy's segment log store together with each
//! of Eddy's state machines (on the in-memory disk and state store).

use std::path::Path;
use std::sync::Arc;

use eddy_node::meta::MetaStateMachine;
use eddy_node::partition::PartitionStateMachine;
use eddy_raft::C;
use eddy_raft::Runtime;
use eddy_raft::log::LogConfig;
use eddy_raft::log::LogStore;
use eddy_raft::mem::MemDisk;
use eddy_raft::mem::MemStateStore;
use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::TypeConfigExt;

async fn log_store() -> Result<LogStore, StorageError<C>> {
    let disk = MemDisk::new();
    let (log, _) = LogStore::open(
        Arc::new(disk),
        Path::new("/log"),
        LogConfig { segment_bytes_max: 4096, on_sync: None, ..LogConfig::default() },
    )
    .await
    .map_err(|e| StorageError::read(C::err_from_error(&e)))?;
    Ok(log)
}

struct MetaBuilder;

impl StoreBuilder<C, LogStore, MetaStateMachine> for MetaBuilder {
    async fn build(&self) -> Result<((), LogStore, MetaStateMachine), StorageError<C>> {
        let (sm, _) = MetaStateMachine::open(Arc::new(MemStateStore::default()))
            .map_err(|e| StorageError::read(C::err_from_error(&e)))?;
        Ok(((), log_store().await?, sm))
    }
}

struct PartitionBuilder;

impl StoreBuilder<C, LogStore, PartitionStateMachine> for PartitionBuilder {
    async fn build(&self) -> Result<((), LogStore, PartitionStateMachine), StorageError<C>> {
        let (sm, _, _) = PartitionStateMachine::open(Arc::new(MemStateStore::default()), 7)
            .map_err(|e| StorageError::read(C::err_from_error(&e)))?;
        Ok(((), log_store().await?, sm))
    }
}

#[tokio::test]
async fn openraft_suite_with_the_metadata_state_machine() -> Result<(), StorageError<C>> {
    Runtime::scope(1, Suite::test_all(MetaBuilder)).await
}

#[tokio::test]
async fn openraft_suite_with_the_partition_state_machine() -> Result<(), StorageError<C>> {
    Runtime::scope(2, Suite::test_all(PartitionBuilder)).await
}
