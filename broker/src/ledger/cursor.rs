//! Cursors: a consumer's position in a ledger.
//!
//! A cursor's state is its *mark-delete* offset (every offset below it is
//! acknowledged) plus the ranges acknowledged individually above it. A
//! durable cursor is persisted with its ledger (see
//! [`Ledger::persist_cursors`](super::Ledger::persist_cursors)) and holds
//! back retention; a non-durable cursor (a reader) does neither.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Where a new cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    /// At the ledger's start offset.
    Earliest,
    /// At the ledger's end offset (only messages appended from now on).
    Latest,
    /// At an explicit offset (clamped into the ledger's range).
    Offset(u64),
}

/// Options of a new durable cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorOptions {
    /// Retention deletes nothing this cursor has not passed (Pulsar
    /// subscription and AMQP queue semantics). `false` for positions that
    /// must not pin data, e.g. Kafka consumer-group offsets, which expire
    /// with the topic's retention like in Kafka.
    pub holds_retention: bool,
}

impl Default for CursorOptions {
    fn default() -> Self {
        CursorOptions {
            holds_retention: true,
        }
    }
}

/// Half-open ranges of acknowledged offsets, kept disjoint and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive)
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `r`, merging with neighbours.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // Merge with every range that starts inside [start, end].
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Whether `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| offset < e)
    }

    /// Removes everything below `offset`.
    pub fn remove_below(&mut self, offset: u64) {
        let below: Vec<(u64, u64)> = self.ranges.range(..offset).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in below {
            self.ranges.remove(&s);
            if e > offset {
                self.ranges.insert(offset, e);
            }
        }
    }

    /// Removes everything at or above `offset`.
    pub fn remove_from(&mut self, offset: u64) {
        let above: Vec<(u64, u64)> = self
            .ranges
            .iter()
            .filter(|(_, &e)| e > offset)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, _) in above {
            self.ranges.remove(&s);
            if s < offset {
                self.ranges.insert(s, offset);
            }
        }
    }

    /// The range that starts at or covers `offset`, if any.
    fn covering(&self, offset: u64) -> Option<Range<u64>> {
        self.ranges
            .range(..=offset)
            .next_back()
            .filter(|(_, &e)| offset < e)
            .map(|(&s, &e)| s..e)
    }

    /// Number of offsets in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.ranges.iter().map(|(&s, &e)| s..e).collect()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

fn yes() -> bool {
    true
}

/// Persisted form of a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CursorSnapshot {
    pub(crate) mark_delete: u64,
    #[serde(default = "yes")]
    pub(crate) holds_retention: bool,
    #[serde(default)]
    pub(crate) acked: Vec<(u64, u64)>,
    #[serde(default)]
    pub(crate) properties: BTreeMap<String, String>,
}

#[derive(Debug)]
struct CursorState {
    mark_delete: u64,
    acked: RangeSet,
    properties: BTreeMap<String, String>,
    /// Bumped on every change; persistence compares it.
    version: u64,
}

/// A position in a ledger. Cheap to share (`Arc<Cursor>`); all methods take
/// a short internal lock and never block on I/O.
#[derive(Debug)]
pub struct Cursor {
    name: String,
    durable: bool,
    holds_retention: bool,
    state: Mutex<CursorState>,
}

impl Cursor {
    pub(crate) fn new(name: &str, durable: bool, mark_delete: u64) -> Cursor {
        Self::with_retention(name, durable, durable, mark_delete)
    }

    pub(crate) fn with_retention(
        name: &str,
        durable: bool,
        holds_retention: bool,
        mark_delete: u64,
    ) -> Cursor {
        Cursor {
            name: name.to_owned(),
            durable,
            holds_retention,
            state: Mutex::new(CursorState {
                mark_delete,
                acked: RangeSet::default(),
                properties: BTreeMap::new(),
                version: 1,
            }),
        }
    }

    pub(crate) fn from_snapshot(name: &str, snap: CursorSnapshot) -> Cursor {
        let c = Cursor::with_retention(name, true, snap.holds_retention, snap.mark_delete);
        {
            let mut st = c.lock();
            for (s, e) in snap.acked {
                st.acked.insert(s..e);
            }
            st.properties = snap.properties;
            st.version = 0;
        }
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CursorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn snapshot(&self) -> (CursorSnapshot, u64) {
        let st = self.lock();
        (
            CursorSnapshot {
                mark_delete: st.mark_delete,
                holds_retention: self.holds_retention,
                acked: st
                    .acked
                    .ranges()
                    .into_iter()
                    .map(|r| (r.start, r.end))
                    .collect(),
                properties: st.properties.clone(),
            },
            st.version,
        )
    }

    pub(crate) fn version(&self) -> u64 {
        self.lock().version
    }

    /// The cursor's name (unique within its ledger).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the cursor is persisted.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Whether retention waits for this cursor before deleting data.
    pub fn holds_retention(&self) -> bool {
        self.holds_retention
    }

    /// The mark-delete offset: every offset below it is acknowledged.
    pub fn mark_delete(&self) -> u64 {
        self.lock().mark_delete
    }

    /// Acknowledges one offset.
    pub fn ack(&self, offset: u64) {
        self.ack_range(offset..offset + 1);
    }

    /// Acknowledges a half-open range of offsets individually.
    pub fn ack_range(&self, r: Range<u64>) {
        let mut st = self.lock();
        if r.end <= st.mark_delete {
            return;
        }
        if r.start <= st.mark_delete && st.acked.is_empty() {
            // In order, the usual case: no set to update.
            st.mark_delete = r.end;
            st.version += 1;
            return;
        }
        let r = r.start.max(st.mark_delete)..r.end;
        st.acked.insert(r);
        let md = st.mark_delete;
        if let Some(c) = st.acked.covering(md) {
            st.mark_delete = c.end;
            st.acked.remove_below(c.end);
        }
        st.version += 1;
    }

    /// Acknowledges every offset below `upto` (cumulative ack). Moving
    /// backwards is ignored; use [`Cursor::seek`] to rewind.
    pub fn ack_cumulative(&self, upto: u64) {
        let mut st = self.lock();
        if upto <= st.mark_delete {
            return;
        }
        st.mark_delete = upto;
        st.acked.remove_below(upto);
        if let Some(c) = st.acked.covering(upto) {
            st.mark_delete = c.end;
            st.acked.remove_below(c.end);
        }
        st.version += 1;
    }

    /// Whether `offset` has been acknowledged.
    pub fn is_acked(&self, offset: u64) -> bool {
        let st = self.lock();
        offset < st.mark_delete || st.acked.contains(offset)
    }

    /// Ranges acknowledged individually above the mark-delete offset.
    pub fn acked_ranges(&self) -> Vec<Range<u64>> {
        self.lock().acked.ranges()
    }

    /// Number of offsets acknowledged individually above the mark-delete.
    pub fn acked_above_mark_delete(&self) -> u64 {
        self.lock().acked.count()
    }

    /// Moves the cursor to `offset` (forwards or backwards), forgetting
    /// individual acknowledgements. The caller clamps into the ledger range
    /// (see [`Ledger::seek`](super::Ledger::seek)).
    pub(crate) fn reset(&self, offset: u64) {
        let mut st = self.lock();
        st.mark_delete = offset;
        st.acked = RangeSet::default();
        st.version += 1;
    }

    /// Sets a property stored with the cursor (e.g. commit metadata).
    pub fn set_property(&self, key: &str, value: &str) {
        let mut st = self.lock();
        st.properties.insert(key.to_owned(), value.to_owned());
        st.version += 1;
    }

    /// A property stored with the cursor.
    pub fn property(&self, key: &str) -> Option<String> {
        self.lock().properties.get(key).cloned()
    }

    /// Ensures the cursor holds no position at or beyond `end` (the end a
    /// ledger recovered to). Returns whether anything changed.
    pub(crate) fn clamp_below(&self, end: u64) -> bool {
        let mut st = self.lock();
        let before = (st.mark_delete, st.acked.count());
        st.mark_delete = st.mark_delete.min(end);
        st.acked.remove_from(end);
        let changed = (st.mark_delete, st.acked.count()) != before;
        if changed {
            st.version += 1;
        }
        changed
    }

    /// Ensures the mark-delete is not below `start` (after a trim).
    pub(crate) fn clamp_to(&self, start: u64) {
        let mut st = self.lock();
        if st.mark_delete < start {
            st.mark_delete = start;
            st.acked.remove_below(start);
            st.version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn individual_acks_advance_mark_delete() {
        let c = Cursor::new("c", true, 0);
        c.ack(1);
        c.ack(2);
        assert_eq!(c.mark_delete(), 0);
        assert_eq!(c.acked_ranges(), vec![1..3]);
        c.ack(0);
        assert_eq!(c.mark_delete(), 3);
        assert!(c.acked_ranges().is_empty());
        c.ack(5);
        c.ack_cumulative(4);
        assert_eq!(c.mark_delete(), 4);
        assert!(c.is_acked(5));
        assert!(!c.is_acked(4));
        c.ack(4);
        assert_eq!(c.mark_delete(), 6);
    }

    proptest! {
        #[test]
        fn rangeset_matches_model(ops in proptest::collection::vec((0u64..64, 1u64..8), 0..40)) {
            let mut set = RangeSet::default();
            let mut model = [false; 80];
            for (s, l) in ops {
                set.insert(s..s + l);
                for m in &mut model[s as usize..(s + l) as usize] { *m = true; }
            }
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(set.contains(i as u64), m);
            }
            prop_assert_eq!(set.count(), model.iter().filter(|&&m| m).count() as u64);
            let rs = set.ranges();
            for w in rs.windows(2) {
                prop_assert!(w[0].end < w[1].start, "ranges must be disjoint and merged");
            }
        }
    }
}
