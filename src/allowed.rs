//! The names each wildcard allow rule let through: what `/allowed`, `aml-egress allowed`,
//! `suggest --narrow` and the gauge `aml_egress_wildcard_names{rule}` show, so that an
//! operator can see which storage accounts (registries, vaults) compute reached under
//! `*.blob.core.windows.net` and narrow the wildcard to them (`catalog.narrow`).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;

/// One name allowed under a wildcard rule, as `/allowed` serves it (a JSON array of these,
/// most recently seen first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedReport {
    /// The host name as the client named it (normalised: lower case, no trailing dot).
    pub name: String,
    pub port: u16,
    /// The wildcard pattern that allowed it, as written in rules (`*.blob.core.windows.net`,
    /// `regex:...`); rules that share a pattern share it.
    pub rule: String,
    /// Where the first rule that allowed it came from (catalog entry, config line, import).
    pub rule_source: String,
    /// Allowed decisions on this name, port and pattern since it entered the table.
    pub count: u64,
    /// RFC 3339, UTC, seconds.
    pub first_seen: String,
    pub last_seen: String,
}

/// The names each wildcard allow rule let through, bounded: at most `max` (name, port,
/// pattern) entries, the least recently seen evicted first (and counted).
///
/// Recording takes this table's own mutex only, for a hash probe and a few index writes;
/// no reload, scrape or other proxy lock is ever held with it, and a scrape reads the
/// gauges without it. The gauge handle of each pattern is kept here, so that recording a
/// name already seen touches no metric at all. Reload changes the bound through an atomic,
/// applied at the next new name.
pub struct AllowedNames {
    table: Mutex<Table>,
    max: AtomicUsize,
    /// `aml_egress_wildcard_names{rule}`: names in the table per pattern.
    names: IntGaugeVec,
    /// `aml_egress_allowed_names_evicted_total`.
    evicted: IntCounter,
    /// Keyed per process, so that names chosen by a client cannot be made to collide.
    hasher: RandomState,
}

/// One entry; `prev`/`next` link the recency list (most recent at `head`).
struct Entry {
    hash: u64,
    name: Box<str>,
    port: u16,
    rule: Arc<str>,
    source: Box<str>,
    count: u64,
    first: SystemTime,
    last: SystemTime,
    prev: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;

#[derive(Default)]
struct Table {
    /// Entry slots; `None` slots are on `free`.
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Slots by key hash (a short list on the rare collision).
    index: HashMap<u64, Vec<u32>, BuildHasherDefault<Prehashed>>,
    head: u32,
    tail: u32,
    len: usize,
    /// The gauge of each pattern seen, made once per pattern.
    gauges: HashMap<Arc<str>, IntGauge>,
}

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What [`AllowedNames::record`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The name was in the table already under this pattern.
    Again,
    /// The first time this name (and port) is allowed under this pattern since it entered
    /// the table: worth a log line.
    First,
}

impl AllowedNames {
    /// An empty table of at most `max` names (at least one), with its metrics registered on
    /// `registry`.
    ///
    /// # Panics
    /// When `registry` already holds these metric names (a programming error).
    pub fn new(registry: &Registry, max: usize) -> Self {
        let names = IntGaugeVec::new(
            Opts::new(
                "aml_egress_wildcard_names",
                "Distinct names (with their port) allowed under each wildcard rule pattern and kept in /allowed; rules that share a pattern share a series.",
            ),
            &["rule"],
        )
        .expect("valid metric");
        let evicted = IntCounter::new(
            "aml_egress_allowed_names_evicted_total",
            "Names removed from /allowed to stay within metrics.max_allowed_names (least recently seen first).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(names.clone()))
            .expect("registered once");
        registry
            .register(Box::new(evicted.clone()))
            .expect("registered once");
        AllowedNames {
            table: Mutex::new(Table {
                head: NIL,
                tail: NIL,
                ..Table::default()
            }),
            max: AtomicUsize::new(max.max(1)),
            names,
            evicted,
            hasher: RandomState::new(),
        }
    }

    /// A reload changed `metrics.max_allowed_names`; the table shrinks at the next new name.
    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    /// Record that `name` on `port` was allowed by a rule with the wildcard pattern `rule`
    /// (`source` names that rule, asked for only when the name is new).
    pub fn record(
        &self,
        name: &str,
        port: u16,
        rule: &str,
        source: impl FnOnce() -> String,
    ) -> Recorded {
        let hash = self.hasher.hash_one((name, port, rule));
        let now = SystemTime::now();
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = t.find(hash, name, port, rule) {
            t.touch(i);
            if let Some(e) = t.slots[i as usize].as_mut() {
                e.count += 1;
                e.last = now;
            }
            return Recorded::Again;
        }
        let max = self.max.load(Ordering::Relaxed);
        while t.len >= max {
            let Some(gone) = t.evict() else { break };
            if let Some(g) = t.gauges.get(&gone.rule) {
                g.dec();
            }
            self.evicted.inc();
        }
        let rule: Arc<str> = match t.gauges.get_key_value(rule) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = rule.into();
                let g = self.names.with_label_values(&[rule]);
                t.gauges.insert(k.clone(), g);
                k
            }
        };
        if let Some(g) = t.gauges.get(&rule) {
            g.inc();
        }
        t.insert(Entry {
            hash,
            name: name.into(),
            port,
            rule,
            source: source().into(),
            count: 1,
            first: now,
            last: now,
            prev: NIL,
            next: NIL,
        });
        Recorded::First
    }

    /// The names kept, most recently seen first, only those of pattern `rule` when given,
    /// at most `limit`. Holds the table's lock while it copies (at most `max` entries).
    pub fn report(&self, rule: Option<&str>, limit: usize) -> Vec<AllowedReport> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut i = t.head;
        while i != NIL && out.len() < limit {
            let Some(e) = t.slots[i as usize].as_ref() else {
                break;
            };
            if rule.is_none_or(|r| *e.rule == *r) {
                out.push(AllowedReport {
                    name: e.name.to_string(),
                    port: e.port,
                    rule: e.rule.to_string(),
                    rule_source: e.source.to_string(),
                    count: e.count,
                    first_seen: rfc3339(e.first),
                    last_seen: rfc3339(e.last),
                });
            }
            i = e.next;
        }
        out
    }

    /// Forget the names for which `keep(name, port, pattern)` says no (after a reload, those
    /// the new policy no longer allows under that pattern), so that `/allowed` and
    /// `suggest --narrow` do not offer again what a narrowing refused. `keep` runs without
    /// the table's lock (on a copy of the keys); returns how many were forgotten.
    pub fn retain(&self, keep: impl Fn(&str, u16, &str) -> bool) -> usize {
        let keys: Vec<(u32, Box<str>, u16, Arc<str>)> = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.slots
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    let e = e.as_ref()?;
                    Some((i as u32, e.name.clone(), e.port, e.rule.clone()))
                })
                .collect()
        };
        let gone: Vec<_> = keys
            .into_iter()
            .filter(|(_, name, port, rule)| !keep(name, *port, rule))
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for (i, name, port, rule) in gone {
            // The slot may have been evicted and reused since the copy.
            let same = t.slots[i as usize]
                .as_ref()
                .is_some_and(|e| e.name == name && e.port == port && e.rule == rule);
            if same && let Some(e) = t.remove(i) {
                if let Some(g) = t.gauges.get(&e.rule) {
                    g.dec();
                }
                n += 1;
            }
        }
        n
    }

    /// How many names are kept.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    /// Whether no name is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    fn find(&self, hash: u64, name: &str, port: u16, rule: &str) -> Option<u32> {
        self.index.get(&hash)?.iter().copied().find(|&i| {
            self.slots[i as usize]
                .as_ref()
                .is_some_and(|e| e.port == port && *e.name == *name && *e.rule == *rule)
        })
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = match self.slots[i as usize].as_ref() {
            Some(e) => (e.prev, e.next),
            None => return,
        };
        match prev {
            NIL => self.head = next,
            p => {
                if let Some(e) = self.slots[p as usize].as_mut() {
                    e.next = next;
                }
            }
        }
        match next {
            NIL => self.tail = prev,
            n => {
                if let Some(e) = self.slots[n as usize].as_mut() {
                    e.prev = prev;
                }
            }
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        if let Some(e) = self.slots[i as usize].as_mut() {
            e.prev = NIL;
            e.next = old;
        }
        match old {
            NIL => self.tail = i,
            h => {
                if let Some(e) = self.slots[h as usize].as_mut() {
                    e.prev = i;
                }
            }
        }
        self.head = i;
    }

    /// Make slot `i` the most recently seen.
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn insert(&mut self, e: Entry) {
        let hash = e.hash;
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(e);
                i
            }
            None => {
                self.slots.push(Some(e));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.entry(hash).or_default().push(i);
        self.push_front(i);
        self.len += 1;
    }

    /// Remove the least recently seen entry.
    fn evict(&mut self) -> Option<Entry> {
        match self.tail {
            NIL => None,
            i => self.remove(i),
        }
    }

    /// Remove the entry in slot `i`.
    fn remove(&mut self, i: u32) -> Option<Entry> {
        self.slots.get(i as usize)?.as_ref()?;
        self.unlink(i);
        let e = self.slots[i as usize].take()?;
        if let Some(v) = self.index.get_mut(&e.hash) {
            v.retain(|&j| j != i);
            if v.is_empty() {
                self.index.remove(&e.hash);
            }
        }
        self.free.push(i);
        self.len -= 1;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    fn rows(t: &AllowedNames) -> Vec<String> {
        t.report(None, usize::MAX)
            .into_iter()
            .map(|r| format!("{}:{} {} {}", r.name, r.port, r.rule, r.count))
            .collect()
    }

    #[test]
    fn names_are_kept_per_pattern_most_recent_first_and_counted() {
        let reg = Registry::new();
        let t = AllowedNames::new(&reg, 10);
        let src = || "catalog".to_owned();
        assert_eq!(t.record("a.blob.x", 443, "*.blob.x", src), Recorded::First);
        assert_eq!(t.record("b.blob.x", 443, "*.blob.x", src), Recorded::First);
        assert_eq!(t.record("a.blob.x", 443, "*.blob.x", src), Recorded::Again);
        assert_eq!(t.record("a.blob.x", 8443, "*.blob.x", src), Recorded::First);
        assert_eq!(t.record("a.blob.x", 443, "*.x", src), Recorded::First);
        assert_eq!(
            rows(&t),
            [
                "a.blob.x:443 *.x 1",
                "a.blob.x:8443 *.blob.x 1",
                "a.blob.x:443 *.blob.x 2",
                "b.blob.x:443 *.blob.x 1",
            ]
        );
        assert_eq!(t.report(Some("*.x"), 10).len(), 1);
        assert_eq!(t.report(None, 2).len(), 2);
        let text = render(&reg);
        assert!(
            text.contains("aml_egress_wildcard_names{rule=\"*.blob.x\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("aml_egress_wildcard_names{rule=\"*.x\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn the_least_recently_seen_name_is_evicted_and_counted() {
        let reg = Registry::new();
        let t = AllowedNames::new(&reg, 2);
        let src = String::new;
        t.record("a.x", 443, "*.x", src);
        t.record("b.x", 443, "*.x", src);
        t.record("a.x", 443, "*.x", src); // b is now the least recent
        t.record("c.x", 443, "*.x", src);
        assert_eq!(rows(&t), ["c.x:443 *.x 1", "a.x:443 *.x 2"]);
        // b comes back as a first use.
        assert_eq!(t.record("b.x", 443, "*.x", src), Recorded::First);
        t.set_max(1);
        t.record("d.x", 443, "*.x", src);
        assert_eq!(rows(&t), ["d.x:443 *.x 1"]);
        let text = render(&reg);
        assert!(
            text.contains("aml_egress_allowed_names_evicted_total 4"),
            "{text}"
        );
        assert!(
            text.contains("aml_egress_wildcard_names{rule=\"*.x\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn names_a_new_policy_refuses_are_forgotten_and_uncounted() {
        let reg = Registry::new();
        let t = AllowedNames::new(&reg, 10);
        for n in ["a.x", "b.x", "c.x"] {
            t.record(n, 443, "*.x", String::new);
        }
        assert_eq!(t.retain(|name, _, _| name != "b.x"), 1);
        assert_eq!(rows(&t), ["c.x:443 *.x 1", "a.x:443 *.x 1"]);
        assert!(render(&reg).contains("aml_egress_wildcard_names{rule=\"*.x\"} 2"));
        // The freed slot is reused, and the recency list still holds.
        t.record("d.x", 443, "*.x", String::new);
        t.record("a.x", 443, "*.x", String::new);
        assert_eq!(
            rows(&t),
            ["a.x:443 *.x 2", "d.x:443 *.x 1", "c.x:443 *.x 1"]
        );
        assert_eq!(t.table.lock().unwrap().slots.len(), 3);
    }

    #[test]
    fn a_flood_of_distinct_names_stays_within_the_bound() {
        let reg = Registry::new();
        let t = AllowedNames::new(&reg, 100);
        for i in 0..20_000 {
            t.record(&format!("n{i}.blob.x"), 443, "*.blob.x", String::new);
        }
        assert_eq!(t.len(), 100);
        let table = t.table.lock().unwrap();
        // Slots are reused: the table never holds more than the bound.
        assert_eq!(table.slots.len(), 100);
        assert_eq!(table.index.len(), 100);
        drop(table);
        let newest = t.report(None, 1);
        assert_eq!(newest[0].name, "n19999.blob.x");
    }

    fn render(reg: &Registry) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&reg.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}
