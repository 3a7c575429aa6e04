//! Wall-time spans for finding where a merge spends its time: `REGMEAN_PROFILE=1` makes
//! `merge` print the total per span name at the end, with the cores the process kept busy
//! meanwhile (its CPU time over the span's wall time: 2.0 on two cores is no idle core).
//! Off by default; then a span costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
/// Per span name: wall time, the process's CPU time meanwhile, calls.
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, Duration, u64)>> =
    Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("REGMEAN_PROFILE").is_some_and(|v| v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Runs `f`, adding its wall time to `name`'s total when profiling.
pub fn span<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let (t, cpu) = (Instant::now(), process_cpu_time());
    let out = f();
    let (wall, cpu) = (t.elapsed(), process_cpu_time().saturating_sub(cpu));
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let e = totals.entry(name).or_default();
    e.0 += wall;
    e.1 += cpu;
    e.2 += 1;
    out
}

/// The CPU time of all of this process's threads so far (zero where it cannot be read).
fn process_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill; the clock id is a constant.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    Duration::ZERO
}

/// The totals so far, one line per span: seconds, calls, the cores busy meanwhile, name.
/// Spans that run at the same time on several threads each count the whole process's CPU.
pub fn report() -> String {
    let totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    totals
        .iter()
        .map(|(name, (wall, cpu, n))| {
            let busy = cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
            format!(
                "{:>9.3} s {n:>7}×  {busy:>4.2} cores  {name}\n",
                wall.as_secs_f64()
            )
        })
        .collect()
}
