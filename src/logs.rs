//! The log budget: how many lines of each kind may be written, so that no flood of
//! refusals, refused clients or upstream errors can fill a disk. Lines over the budget are
//! counted (`aml_egress_log_lines_suppressed_total`), not written.
//!
//! Per target, at most `log.denied_lines_per_minute` denial lines a minute (the denied
//! table counts each target's denials); in all, 100 times that for denials and 10 times
//! that for lines about clients and upstream failures.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::IntCounter;

/// Line budgets per minute; one per process, kept across reloads.
pub struct LogBudget {
    per_target: AtomicU64,
    /// (minute, lines so far) for all denial lines together.
    denials: Mutex<(u64, u64)>,
    /// (minute, lines so far) for lines about clients and upstream failures.
    others: Mutex<(u64, u64)>,
    /// (minute, lines so far) for "first use under wildcard" lines.
    first_uses: Mutex<(u64, u64)>,
    started: Instant,
    suppressed: IntCounter,
}

impl LogBudget {
    /// `per_target` is `log.denied_lines_per_minute`; `suppressed` counts what is not
    /// written.
    pub fn new(per_target: u32, suppressed: IntCounter) -> Self {
        LogBudget {
            per_target: AtomicU64::new(u64::from(per_target)),
            denials: Mutex::new((0, 0)),
            others: Mutex::new((0, 0)),
            first_uses: Mutex::new((0, 0)),
            started: Instant::now(),
            suppressed,
        }
    }

    /// A reload changed `log.denied_lines_per_minute`.
    pub fn set_per_target(&self, n: u32) {
        self.per_target.store(u64::from(n), Ordering::Relaxed);
    }

    /// Whether a denial line may be written, given how often its target was denied in the
    /// current minute (from the denied table).
    pub fn denial(&self, target_this_minute: u64) -> bool {
        if target_this_minute > self.per_target.load(Ordering::Relaxed) {
            self.suppressed.inc();
            return false;
        }
        // Random names each get their own allowance; the total is bounded too.
        self.take(&self.denials, 100)
    }

    /// Whether a line about a client (a limit hit, a refused client) or an upstream failure
    /// may be written.
    pub fn line(&self) -> bool {
        self.take(&self.others, 10)
    }

    /// Whether a "first use under wildcard" line may be written: as many a minute as
    /// denial lines, so that a flood of new names under a wildcard cannot fill a disk nor
    /// crowd out the lines about refusals.
    pub fn first_use(&self) -> bool {
        self.take(&self.first_uses, 100)
    }

    fn take(&self, window: &Mutex<(u64, u64)>, times: u64) -> bool {
        let minute = self.started.elapsed().as_secs() / 60;
        let budget = self.per_target.load(Ordering::Relaxed) * times;
        let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0 != minute {
            *w = (minute, 0);
        }
        w.1 += 1;
        let ok = w.1 <= budget;
        if !ok {
            self.suppressed.inc();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_target_and_total_budgets() {
        let suppressed = IntCounter::new("s", "s").unwrap();
        let b = LogBudget::new(2, suppressed.clone());
        assert!(b.denial(1) && b.denial(2));
        assert!(!b.denial(3));
        assert_eq!(suppressed.get(), 1);
        let allowed = (0..30).filter(|_| b.line()).count();
        assert_eq!(allowed, 20);
        assert_eq!(suppressed.get(), 11);
    }
}
