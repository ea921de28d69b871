//! What opening a checksummed state tree costs: fills a `sled` tree with N offset-index-sized
//! entries written before checksums existed (format version 0), then times the first open
//! through `CheckedStore` (conversion, then a check of every entry) and a second one (the check
//! alone). `cargo run --release -p eddy-raft --example state_open -- 1000000`

#![allow(clippy::disallowed_methods)] // A measurement reads real time.

use std::sync::Arc;
use std::time::Instant;

use eddy_raft::kv::KvBatch;
use eddy_raft::kv::SledStateStore;
use eddy_raft::kv::StateStore;
use eddy_raft::kv::checked::CheckedStore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n: u64 = std::env::args().nth(1).map_or(Ok(1_000_000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let sled = Arc::new(SledStateStore::open(dir.path())?);
    let plain = sled.tree("g1")?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
        let mut b = KvBatch::default();
        for i in chunk {
            let mut k = vec![b'o'];
            k.extend_from_slice(&i.to_be_bytes());
            b.put(k, [i.to_be_bytes(), i.to_be_bytes()].concat()[..12].to_vec());
        }
        plain.apply(b)?;
    }
    rt.block_on(sled.flush())?;
    let checked = CheckedStore::new(sled.clone());
    let t = Instant::now();
    checked.tree("g1")?;
    let convert = t.elapsed();
    rt.block_on(sled.flush())?;
    let t = Instant::now();
    checked.tree("g1")?;
    let check = t.elapsed();
    println!(
        "{n} entries: first open (convert + check) {:.3} s, later opens (check) {:.3} s = {:.0} entries/ms",
        convert.as_secs_f64(),
        check.as_secs_f64(),
        n as f64 / check.as_secs_f64() / 1000.0
    );
    Ok(())
}
