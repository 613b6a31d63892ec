//! Compiled name tables: exact names, suffixes, and (only when there are any) regexes.
//!
//! A look-up costs one hash probe for the whole name plus one per suffix length that the
//! rule set actually uses, so it grows with the number of labels in the host, not with the
//! number of rules.

use regex::RegexSet;

use super::RuleId;
use super::hash::FxMap;
use super::pattern::HostPattern;

/// Name rules of one action (allow or deny), compiled for look-up.
#[derive(Debug, Default)]
pub struct NameTable {
    exact: FxMap<Box<str>, Vec<RuleId>>,
    suffix: FxMap<Box<str>, Vec<RuleId>>,
    /// Bit `n` is set when some suffix key has `n` labels (n capped at 63).
    suffix_labels: u64,
    regex: Option<(RegexSet, Vec<RuleId>)>,
}

fn label_count(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'.').count() + 1
}

impl NameTable {
    /// File a host pattern.
    pub fn insert(&mut self, pattern: &HostPattern, id: RuleId) {
        match pattern {
            HostPattern::Exact(n) => self.exact.entry(n.as_str().into()).or_default().push(id),
            HostPattern::Subdomains(s) => self.insert_suffix(s, id),
            HostPattern::ApexAndSubdomains(s) => {
                self.exact.entry(s.as_str().into()).or_default().push(id);
                self.insert_suffix(s, id);
            }
        }
    }

    fn insert_suffix(&mut self, suffix: &str, id: RuleId) {
        self.suffix_labels |= 1 << label_count(suffix).min(63);
        self.suffix.entry(suffix.into()).or_default().push(id);
    }

    /// Compile the regex rules into one set; consulted only when this is called.
    pub fn set_regexes(
        &mut self,
        patterns: &[String],
        ids: Vec<RuleId>,
    ) -> Result<(), regex::Error> {
        if !patterns.is_empty() {
            self.regex = Some((RegexSet::new(patterns)?, ids));
        }
        Ok(())
    }

    /// Whether no name rule is filed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffix.is_empty() && self.regex.is_none()
    }

    /// Visit candidate rules for a normalised name, most specific first (exact name, then
    /// longer suffixes, then regexes), until `visit` returns `true`.
    #[inline]
    pub fn find(&self, name: &str, mut visit: impl FnMut(RuleId) -> bool) -> bool {
        if let Some(ids) = self.exact.get(name)
            && ids.iter().any(|&id| visit(id))
        {
            return true;
        }
        if self.suffix_labels != 0 {
            let mut labels = label_count(name);
            for (i, b) in name.bytes().enumerate() {
                if b != b'.' {
                    continue;
                }
                labels -= 1;
                if self.suffix_labels & (1 << labels.min(63)) == 0 {
                    continue;
                }
                if let Some(ids) = self.suffix.get(&name[i + 1..])
                    && ids.iter().any(|&id| visit(id))
                {
                    return true;
                }
            }
        }
        if let Some((set, ids)) = &self.regex
            && set.is_match(name)
        {
            return set.matches(name).iter().any(|i| visit(ids[i]));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[HostPattern]) -> NameTable {
        let mut t = NameTable::default();
        for (i, p) in patterns.iter().enumerate() {
            t.insert(p, RuleId(i as u32));
        }
        t
    }

    fn first(t: &NameTable, name: &str) -> Option<u32> {
        let mut hit = None;
        t.find(name, |id| {
            hit = Some(id.0);
            true
        });
        hit
    }

    #[test]
    fn exact_beats_suffix_and_longer_suffix_beats_shorter() {
        let t = table(&[
            HostPattern::Subdomains("windows.net".into()),
            HostPattern::Subdomains("blob.core.windows.net".into()),
            HostPattern::Exact("x.blob.core.windows.net".into()),
        ]);
        assert_eq!(first(&t, "x.blob.core.windows.net"), Some(2));
        assert_eq!(first(&t, "y.blob.core.windows.net"), Some(1));
        assert_eq!(first(&t, "core.windows.net"), Some(0));
        assert_eq!(first(&t, "windows.net"), None);
    }
}
