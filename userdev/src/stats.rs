//! The device's counters, and the line in which the VMM reports them at
//! exit: `vmm: stats NAME: posted_stores=1 shadow_loads=2 ...`. The
//! benchmark and the in-VM tests read the same line back with [`lines`].

use std::fmt;
use std::str::FromStr;

use crate::sys;

/// The device's counters (`KVM_DEV_USER_GRP_STATS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub posted_stores: u64,
    pub shadow_loads: u64,
    pub forwarded_loads: u64,
    pub timeouts: u64,
    pub dropped_stores: u64,
    pub queue_full_waits: u64,
    pub detached_loads: u64,
    /// Accesses failed at once because an earlier wait on this backend
    /// timed out and the backend has shown no progress since.
    pub stalled_accesses: u64,
    /// Posted stores queued without waking the backend (batched).
    pub batched_stores: u64,
    /// Records a released backend had not consumed, kept for the next one.
    pub kept_records: u64,
}

/// Every counter's name and its attribute in `KVM_DEV_USER_GRP_STATS`, in
/// the uAPI's order, which is also the order of [`Stats::fields_mut`].
pub(crate) const COUNTERS: [(&str, u64); 10] = [
    ("posted_stores", sys::KVM_DEV_USER_STAT_POSTED_STORES),
    ("shadow_loads", sys::KVM_DEV_USER_STAT_SHADOW_LOADS),
    ("forwarded_loads", sys::KVM_DEV_USER_STAT_FORWARDED_LOADS),
    ("timeouts", sys::KVM_DEV_USER_STAT_TIMEOUTS),
    ("dropped_stores", sys::KVM_DEV_USER_STAT_DROPPED_STORES),
    ("queue_full_waits", sys::KVM_DEV_USER_STAT_QUEUE_FULL_WAITS),
    ("detached_loads", sys::KVM_DEV_USER_STAT_DETACHED_LOADS),
    ("stalled_accesses", sys::KVM_DEV_USER_STAT_STALLED_ACCESSES),
    ("batched_stores", sys::KVM_DEV_USER_STAT_BATCHED_STORES),
    ("kept_records", sys::KVM_DEV_USER_STAT_KEPT_RECORDS),
];

impl Stats {
    /// The counters, in the order of [`COUNTERS`].
    pub(crate) fn fields_mut(&mut self) -> [&mut u64; 10] {
        [
            &mut self.posted_stores,
            &mut self.shadow_loads,
            &mut self.forwarded_loads,
            &mut self.timeouts,
            &mut self.dropped_stores,
            &mut self.queue_full_waits,
            &mut self.detached_loads,
            &mut self.stalled_accesses,
            &mut self.batched_stores,
            &mut self.kept_records,
        ]
    }

    /// Every counter by name, in the uAPI's order.
    pub fn counters(&self) -> [(&'static str, u64); 10] {
        let mut values = *self;
        let values = values.fields_mut().map(|v| *v);
        std::array::from_fn(|i| (COUNTERS[i].0, values[i]))
    }

    fn counter_mut(&mut self, name: &str) -> Option<&mut u64> {
        let i = COUNTERS.iter().position(|&(n, _)| n == name)?;
        self.fields_mut().into_iter().nth(i)
    }
}

/// `name=value` for every counter, separated by spaces.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.counters().iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={value}")?;
        }
        Ok(())
    }
}

/// What [`Stats`]' `Display` wrote: every counter, each once.
impl FromStr for Stats {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut stats = Stats::default();
        let mut seen = Vec::new();
        for (name, value) in pairs(s) {
            let counter = stats
                .counter_mut(name)
                .ok_or_else(|| format!("unknown counter {name:?}"))?;
            if seen.contains(&name) {
                return Err(format!("counter {name:?} given twice"));
            }
            *counter = value;
            seen.push(name);
        }
        match stats.counters().iter().find(|(n, _)| !seen.contains(n)) {
            Some((missing, _)) => Err(format!("counter {missing:?} missing")),
            None => Ok(stats),
        }
    }
}

/// What starts the VMM's line for one device's counters.
pub const LINE_PREFIX: &str = "vmm: stats ";

/// The line that reports `counters` (a [`Stats`], or the counters of
/// another transport) for the device called `device`.
pub fn line(device: &str, counters: &dyn fmt::Display) -> String {
    format!("{LINE_PREFIX}{device}: {counters}")
}

/// The device name and the counters of every stats line in `text`.
pub fn lines(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(LINE_PREFIX)?.split_once(": "))
}

/// The `name=value` words of a counters text; other words are skipped.
pub fn pairs(counters: &str) -> impl Iterator<Item = (&str, u64)> {
    counters.split_whitespace().filter_map(|w| {
        let (name, value) = w.split_once('=')?;
        Some((name, value.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips() {
        let s = Stats {
            posted_stores: 240,
            forwarded_loads: 7,
            stalled_accesses: 2,
            ..Stats::default()
        };
        let text = format!(
            "vmm: edu: emulator pid 5 started\n{}\nemulator[edu]: done\n",
            line("edu at 00:01.0", &s)
        );
        let found: Vec<_> = lines(&text).collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "edu at 00:01.0");
        assert_eq!(found[0].1.parse::<Stats>(), Ok(s));
    }

    #[test]
    fn parse_wants_every_counter_once() {
        let s = Stats::default().to_string();
        assert!(s.parse::<Stats>().is_ok());
        let missing = s.replace("timeouts=0", "");
        assert!(missing.parse::<Stats>().unwrap_err().contains("timeouts"));
        let twice = format!("{s} shadow_loads=1");
        assert!(twice.parse::<Stats>().unwrap_err().contains("twice"));
        let unknown = format!("{s} lost=1");
        assert!(unknown.parse::<Stats>().unwrap_err().contains("lost"));
    }

    #[test]
    fn pairs_skip_other_words() {
        let p: Vec<_> = pairs("socket timeouts=3 x=y in-process").collect();
        assert_eq!(p, vec![("timeouts", 3)]);
    }
}
