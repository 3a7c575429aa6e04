//! Wall-time spans for finding where a merge spends its time: `REGMEAN_PROFILE=1` makes
//! `merge` print the total per span name at the end. Off by default; then a span costs one
//! relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

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
    let t = Instant::now();
    let out = f();
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let e = totals.entry(name).or_default();
    e.0 += t.elapsed();
    e.1 += 1;
    out
}

/// The totals so far, one line per span: seconds, calls, name.
pub fn report() -> String {
    let totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    totals
        .iter()
        .map(|(name, (d, n))| format!("{:>9.3} s {n:>7}×  {name}\n", d.as_secs_f64()))
        .collect()
}
