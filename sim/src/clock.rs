//! The process's clocks read simulated time while a simulation runs.
//!
//! Every simulated host runs on a paused tokio clock that turmoil advances, but dependencies
//! also read the process clock directly. h2 forgets a stream it reset once one second of
//! `std::time::Instant` has passed, and answers a late frame for a forgotten stream with a
//! `RST_STREAM` that a remembered one does not get. So how fast the machine happened to run a
//! simulation changed the frames on the simulated wire, and with them the run: seed 3 with 300
//! partitions diverged about one run in six, more often on a cold or busy machine.
//!
//! The `eddy-sim` binary therefore defines the C library's `clock_gettime` itself (see its
//! `main.rs`; madsim does the same), and the run loop calls [`set`] before every simulation
//! step. While a run is under way, every monotonic clock reads [`MONOTONIC_BASE`] plus the
//! simulated time, and the real-time clock reads the simulation's epoch plus the simulated time:
//! all hosts, tokio's clocks and every dependency see one clock that moves only with the
//! simulation. CPU-time clocks, and every clock outside a run, read the kernel. The report's wall
//! time comes from [`wall_elapsed`], which always asks the kernel.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cluster::EPOCH_SECS;

/// `NOW_NANOS` holds this while no simulation runs: clocks read the kernel.
const OFF: u64 = u64::MAX;

/// Simulated nanoseconds since the run started, or [`OFF`].
static NOW_NANOS: AtomicU64 = AtomicU64::new(OFF);

/// What the monotonic clocks read when a simulation starts. Any fixed value works; a large one
/// keeps `Instant - Duration` arithmetic in dependencies from underflowing.
pub const MONOTONIC_BASE: Duration = Duration::from_secs(1_000_000);

/// From now on, the process's clocks read `elapsed` simulated time since the run started.
pub fn set(elapsed: Duration) {
    NOW_NANOS.store(u64::try_from(elapsed.as_nanos()).unwrap_or(OFF - 1), Ordering::Relaxed);
}

/// The clocks read the kernel again. Runs on drop, so a failing run releases them too.
pub struct Simulated;

impl Simulated {
    /// Clocks read simulated time from 0 until the returned guard is dropped.
    pub fn start() -> Self {
        set(Duration::ZERO);
        Self
    }
}

impl Drop for Simulated {
    fn drop(&mut self) {
        NOW_NANOS.store(OFF, Ordering::Relaxed);
    }
}

/// What `clock_gettime(clock)` reads now, as (seconds, nanoseconds), or `None` when the kernel
/// should answer (no run under way, or a clock that is not a time of day or a monotonic time).
pub fn reading(clock: libc::clockid_t) -> Option<(i64, i64)> {
    let now = NOW_NANOS.load(Ordering::Relaxed);
    if now == OFF {
        return None;
    }
    let base = match clock {
        libc::CLOCK_MONOTONIC
        | libc::CLOCK_MONOTONIC_RAW
        | libc::CLOCK_MONOTONIC_COARSE
        | libc::CLOCK_BOOTTIME => MONOTONIC_BASE,
        libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE | libc::CLOCK_TAI => {
            Duration::from_secs(EPOCH_SECS)
        }
        _ => return None,
    };
    let t = base + Duration::from_nanos(now);
    Some((t.as_secs() as i64, i64::from(t.subsec_nanos())))
}

/// Asks the kernel for a clock, bypassing the simulated one.
///
/// # Safety
/// As `clock_gettime`: `tp` points to a writable `timespec`.
#[allow(unsafe_code)]
pub unsafe fn kernel_clock(clock: libc::clockid_t, tp: *mut libc::timespec) -> libc::c_int {
    // SAFETY: the raw system call writes one `timespec` to `tp`, which the caller guarantees.
    unsafe { libc::syscall(libc::SYS_clock_gettime, clock, tp) as libc::c_int }
}

/// Real time since `start` (a reading of [`wall_now`]), for the report.
pub fn wall_elapsed(start: Duration) -> Duration {
    wall_now().saturating_sub(start)
}

/// The kernel's monotonic clock, also while a simulation runs.
pub fn wall_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a local `timespec`.
    #[allow(unsafe_code)]
    if unsafe { kernel_clock(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
