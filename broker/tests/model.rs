//! Random sequences of append, read, ack, seek, trim and restart against
//! the ledger, checked step by step against an in-memory model.

mod common;

use std::collections::BTreeSet;

use broker::{BrokerError, InitialPosition};
use common::{entry, open, policy};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append { count: u32, size: usize },
    Read { at: u16, max_bytes: usize },
    Ack { cursor: usize, at: u16 },
    AckCumulative { cursor: usize, at: u16 },
    Seek { cursor: usize, at: u16 },
    Trim { at: u16 },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..4, 0usize..700).prop_map(|(count, size)| Op::Append { count, size }),
        3 => (any::<u16>(), 1usize..3000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        3 => (0usize..2, any::<u16>()).prop_map(|(cursor, at)| Op::Ack { cursor, at }),
        1 => (0usize..2, any::<u16>()).prop_map(|(cursor, at)| Op::AckCumulative { cursor, at }),
        1 => (0usize..2, any::<u16>()).prop_map(|(cursor, at)| Op::Seek { cursor, at }),
        1 => any::<u16>().prop_map(|at| Op::Trim { at }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Default, Clone)]
struct CursorModel {
    mark_delete: u64,
    acked: BTreeSet<u64>,
}

impl CursorModel {
    fn normalize(&mut self) {
        while self.acked.remove(&self.mark_delete) {
            self.mark_delete += 1;
        }
        let md = self.mark_delete;
        self.acked.retain(|&o| o >= md);
    }
}

struct Model {
    /// (base, count, payload)
    entries: Vec<(u64, u32, Vec<u8>)>,
    start: u64,
    end: u64,
    cursors: [CursorModel; 2],
}

fn pick(at: u16, lo: u64, hi: u64) -> u64 {
    // An offset in [lo, hi] (inclusive), sometimes just outside.
    let span = hi - lo + 3;
    (lo + u64::from(at) % span).saturating_sub(1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let pol = policy(4096);
            let mut l = open(dir.path(), pol.clone());
            let names = ["a", "b"];
            let mut m = Model { entries: Vec::new(), start: 0, end: 0, cursors: Default::default() };
            for n in names {
                l.open_cursor(n, InitialPosition::Earliest).await.unwrap();
            }
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Append { count, size } => {
                        let payload: Vec<u8> = (0..size).map(|i| (i as u8) ^ (step as u8)).collect();
                        let a = l.append(entry(payload.clone(), count, step as i64)).await.unwrap();
                        assert_eq!(a.base_offset, m.end);
                        m.entries.push((m.end, count, payload));
                        m.end += u64::from(count);
                    }
                    Op::Read { at, max_bytes } => {
                        let from = pick(at, m.start, m.end);
                        let r = l.read(from, max_bytes).await;
                        if from < m.start || from > m.end {
                            assert!(matches!(r, Err(BrokerError::OffsetOutOfRange { .. })), "step {step}: {r:?}");
                            continue;
                        }
                        let got = r.unwrap();
                        if from == m.end {
                            assert!(got.is_empty());
                            continue;
                        }
                        assert!(!got.is_empty(), "step {step}: a read inside the ledger returns an entry");
                        let first = m.entries.iter().position(|(b, c, _)| from >= *b && from < b + u64::from(*c)).unwrap();
                        for (i, e) in got.iter().enumerate() {
                            let (b, c, p) = &m.entries[first + i];
                            assert_eq!((e.base_offset, e.count, e.payload.as_ref()), (*b, *c, &p[..]), "step {step}");
                        }
                    }
                    Op::Ack { cursor, at } => {
                        let o = pick(at, m.start, m.end);
                        let c = l.cursor(names[cursor]).unwrap();
                        c.ack(o);
                        let cm = &mut m.cursors[cursor];
                        if o >= cm.mark_delete { cm.acked.insert(o); }
                        cm.normalize();
                    }
                    Op::AckCumulative { cursor, at } => {
                        let o = pick(at, m.start, m.end);
                        l.cursor(names[cursor]).unwrap().ack_cumulative(o);
                        let cm = &mut m.cursors[cursor];
                        cm.mark_delete = cm.mark_delete.max(o);
                        cm.normalize();
                    }
                    Op::Seek { cursor, at } => {
                        let o = pick(at, m.start, m.end);
                        let c = l.cursor(names[cursor]).unwrap();
                        l.seek(&c, o);
                        m.cursors[cursor] = CursorModel { mark_delete: o.clamp(m.start, m.end), acked: BTreeSet::new() };
                    }
                    Op::Trim { at } => {
                        let o = pick(at, m.start, m.end);
                        let s = l.trim(o).await.unwrap();
                        m.start = m.start.max(o.min(m.end));
                        assert_eq!(s, m.start);
                    }
                    Op::Restart => {
                        l.close().await;
                        drop(l);
                        l = open(dir.path(), pol.clone());
                        // Reopened, no cursor holds a position at or past
                        // the end (entries there were never stored).
                        for cm in &mut m.cursors {
                            cm.mark_delete = cm.mark_delete.min(m.end);
                            let end = m.end;
                            cm.acked.retain(|&o| o < end);
                        }
                    }
                }
                assert_eq!(l.end_offset(), m.end, "step {step}");
                assert_eq!(l.start_offset(), m.start, "step {step}");
                for (i, n) in names.iter().enumerate() {
                    let c = l.cursor(n).unwrap();
                    let cm = &m.cursors[i];
                    assert_eq!(c.mark_delete(), cm.mark_delete, "step {step} cursor {n}");
                    for o in cm.mark_delete..m.end {
                        assert_eq!(c.is_acked(o), cm.acked.contains(&o), "step {step} cursor {n} offset {o}");
                    }
                }
            }
            l.close().await;
        });
    }
}
