//! Which tasks a subscriber receives: a token's task patterns and the `TaskFilter` the hub applies
//! to replay, catch-up and live events alike. Below both the hub and auth, so neither needs the
//! other.

use crate::task::TaskId;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

/// One task pattern from a token: `*`, an exact task id, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    All,
    Exact(TaskId),
    /// Matched against the id's text as it appears on the wire (`101`, `proj-7:a`).
    Prefix(Box<str>),
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Pattern, String> {
        let invalid = || {
            format!(
                "`{}` is not a task pattern (`*`, a task id, or a prefix ending in `*`)",
                text.chars().take(140).collect::<String>()
            )
        };
        match text.strip_suffix('*') {
            Some("") => Ok(Pattern::All),
            // A prefix is held to the task id alphabet, so it can match something and a typo such
            // as `proj 7*` is refused rather than silently matching nothing.
            Some(prefix) => TaskId::parse(prefix)
                .map(|_| Pattern::Prefix(prefix.into()))
                .map_err(|_| invalid()),
            None => TaskId::parse(text)
                .map(Pattern::Exact)
                .map_err(|_| invalid()),
        }
    }
}

impl Pattern {
    pub fn matches(&self, task_id: &TaskId) -> bool {
        match (self, task_id) {
            (Pattern::All, _) => true,
            (Pattern::Exact(id), _) => id == task_id,
            (Pattern::Prefix(prefix), TaskId::Text(text)) => text.starts_with(&**prefix),
            (Pattern::Prefix(prefix), TaskId::Number(n)) => decimal_starts_with(*n, prefix),
        }
    }
}

/// `n.to_string().starts_with(prefix)` without allocating: this runs for every event on every
/// subscription whose token has a prefix pattern.
fn decimal_starts_with(mut n: u64, prefix: &str) -> bool {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits[start..].starts_with(prefix.as_bytes())
}

/// A token's patterns for one right; empty allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Arc<[Pattern]>);

impl Patterns {
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Patterns, String> {
        texts
            .iter()
            .map(|t| t.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(|p| Patterns(p.into()))
    }

    pub fn matches(&self, task_id: &TaskId) -> bool {
        self.0.iter().any(|p| p.matches(task_id))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which events reach a subscriber, and until when. Applied inside the `Subscription`, to replay,
/// live events and catch-up alike, so every transport gets the same rules.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// The tasks the client asked for (`?task_id=`); `None`: all.
    pub ids: Option<Arc<HashSet<TaskId>>>,
    /// The tasks its token may see; `None` when auth is off. Intersected with `ids`.
    pub patterns: Option<Patterns>,
    /// When its token expires: the subscription ends then, between two deliveries.
    pub until: Option<tokio::time::Instant>,
}

impl TaskFilter {
    /// Every task, for ever.
    pub fn all() -> TaskFilter {
        TaskFilter::default()
    }

    /// Only these tasks (all when the set is empty).
    pub fn ids(ids: HashSet<TaskId>) -> TaskFilter {
        TaskFilter {
            ids: (!ids.is_empty()).then(|| Arc::new(ids)),
            ..TaskFilter::default()
        }
    }

    pub fn allows(&self, task_id: &TaskId) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(task_id))
            && self.patterns.as_ref().is_none_or(|p| p.matches(task_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_match_prefixes_like_their_decimal_text() {
        for (n, prefix) in [
            (101, "1"),
            (101, "10"),
            (101, "101"),
            (101, "1010"),
            (101, "2"),
            (0, "0"),
            (u64::MAX, "1844"),
            (7, ""),
        ] {
            assert_eq!(
                decimal_starts_with(n, prefix),
                n.to_string().starts_with(prefix),
                "{n} {prefix}"
            );
        }
    }

    fn id(text: &str) -> TaskId {
        TaskId::parse(text).unwrap()
    }

    #[test]
    fn patterns_match_all_exact_ids_and_prefixes() {
        let p = Patterns::parse(&["101", "proj-7:*"]).unwrap();
        assert!(p.matches(&id("101")));
        assert!(
            p.matches(&TaskId::Number(101)),
            "\"101\" and 101 are one task"
        );
        assert!(!p.matches(&id("0101")));
        assert!(!p.matches(&id("1011")));
        assert!(p.matches(&id("proj-7:a")));
        assert!(p.matches(&id("proj-7:")));
        assert!(!p.matches(&id("proj-70")));
        assert!(Patterns::parse(&["*"]).unwrap().matches(&id("anything")));
        assert!(Patterns::parse(&["10*"])
            .unwrap()
            .matches(&TaskId::Number(105)));
        assert!(!Patterns::parse::<&str>(&[]).unwrap().matches(&id("1")));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in ["", "a b", "**", "proj 7*", "*x", "ä*"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
    }
}
