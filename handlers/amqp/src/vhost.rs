//! Virtual hosts: exchanges, bindings and the queues of one vhost, and
//! routing. Everything here is in memory under one short lock; changes
//! are persisted by [`crate::Shared::persist`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use broker::NamespaceName;
use bytes::{Bytes, BytesMut};

use crate::codec::{decode_table, encode_table, table_get, Table, Value};
use crate::queue::Queue;

/// Exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExKind {
    pub(crate) fn parse(s: &str) -> Option<ExKind> {
        Some(match s {
            "direct" => ExKind::Direct,
            "fanout" => ExKind::Fanout,
            "topic" => ExKind::Topic,
            "headers" => ExKind::Headers,
            _ => return None,
        })
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            ExKind::Direct => "direct",
            ExKind::Fanout => "fanout",
            ExKind::Topic => "topic",
            ExKind::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) enum Dest {
    Queue(String),
    Exchange(String),
}

/// One binding from an exchange.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    pub(crate) dest: Dest,
    pub(crate) routing_key: String,
    pub(crate) arguments: Table,
}

/// An exchange.
#[derive(Debug, Clone)]
pub(crate) struct Exchange {
    pub(crate) name: String,
    pub(crate) kind: ExKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    pub(crate) arguments: Table,
    pub(crate) bindings: Vec<Binding>,
}

impl Exchange {
    pub(crate) fn alternate(&self) -> Option<&str> {
        table_get(&self.arguments, "alternate-exchange").and_then(Value::as_str)
    }
}

/// The mutable state of a vhost.
#[derive(Debug, Default)]
pub(crate) struct VState {
    pub(crate) exchanges: HashMap<String, Exchange>,
    pub(crate) queues: HashMap<String, Arc<Queue>>,
}

/// One virtual host.
#[derive(Debug)]
pub(crate) struct VHost {
    pub(crate) name: String,
    pub(crate) ns: NamespaceName,
    state: Mutex<VState>,
}

/// Result of routing one message.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    pub(crate) queues: Vec<Arc<Queue>>,
}

impl VHost {
    pub(crate) fn new(name: &str, ns: NamespaceName) -> VHost {
        let mut st = VState::default();
        for (n, k) in [
            ("", ExKind::Direct),
            ("amq.direct", ExKind::Direct),
            ("amq.fanout", ExKind::Fanout),
            ("amq.topic", ExKind::Topic),
            ("amq.headers", ExKind::Headers),
            ("amq.match", ExKind::Headers),
        ] {
            st.exchanges.insert(
                n.to_owned(),
                Exchange {
                    name: n.to_owned(),
                    kind: k,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: Vec::new(),
                    bindings: Vec::new(),
                },
            );
        }
        VHost {
            name: name.to_owned(),
            ns,
            state: Mutex::new(st),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, VState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.lock().queues.get(name).cloned()
    }

    /// Routes a message published to `exchange` (which must exist),
    /// following exchange-to-exchange bindings and alternate exchanges.
    pub(crate) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&Table>,
    ) -> Routed {
        let st = self.lock();
        let mut out = Routed::default();
        let mut seen_q: HashSet<String> = HashSet::new();
        let mut visited: HashSet<String> = HashSet::new();
        route_in(
            &st,
            exchange,
            routing_key,
            headers,
            &mut visited,
            &mut seen_q,
            &mut out,
        );
        out
    }

    /// Snapshot for persistence.
    pub(crate) fn meta(&self) -> crate::meta::VhostMeta {
        let st = self.lock();
        let mut m = crate::meta::VhostMeta::default();
        for ex in st.exchanges.values() {
            if ex.name.is_empty() || ex.name.starts_with("amq.") {
                // Built-ins: only their bindings are stored.
            } else if ex.durable {
                m.exchanges.push(crate::meta::ExchangeMeta {
                    name: ex.name.clone(),
                    kind: ex.kind.name().into(),
                    durable: true,
                    auto_delete: ex.auto_delete,
                    internal: ex.internal,
                    arguments: table_bytes(&ex.arguments),
                });
            } else {
                continue;
            }
            for b in &ex.bindings {
                let durable_dest = match &b.dest {
                    Dest::Queue(q) => st.queues.get(q).is_some_and(|q| q.survives_restart()),
                    Dest::Exchange(e) => st.exchanges.get(e).is_some_and(|e| e.durable),
                };
                if durable_dest {
                    m.bindings.push(crate::meta::BindingMeta {
                        source: ex.name.clone(),
                        dest: b.dest.clone(),
                        routing_key: b.routing_key.clone(),
                        arguments: table_bytes(&b.arguments),
                    });
                }
            }
        }
        for q in st.queues.values() {
            m.queues.push(q.meta());
        }
        m.exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        m.queues.sort_by(|a, b| a.name.cmp(&b.name));
        m
    }
}

pub(crate) fn table_bytes(t: &Table) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_table(&mut b, t);
    b.to_vec()
}

pub(crate) fn table_from_bytes(b: &[u8]) -> Table {
    decode_table(Bytes::copy_from_slice(b)).unwrap_or_default()
}

fn route_in(
    st: &VState,
    exchange: &str,
    rk: &str,
    headers: Option<&Table>,
    visited: &mut HashSet<String>,
    seen_q: &mut HashSet<String>,
    out: &mut Routed,
) {
    if !visited.insert(exchange.to_owned()) {
        return;
    }
    let Some(ex) = st.exchanges.get(exchange) else {
        return;
    };
    let before = out.queues.len();
    if ex.name.is_empty() {
        if let Some(q) = st.queues.get(rk) {
            if seen_q.insert(rk.to_owned()) {
                out.queues.push(q.clone());
            }
        }
        return;
    }
    let mut matched_any = false;
    for b in &ex.bindings {
        let m = match ex.kind {
            ExKind::Direct => b.routing_key == rk,
            ExKind::Fanout => true,
            ExKind::Topic => topic_matches(&b.routing_key, rk),
            ExKind::Headers => headers_match(&b.arguments, headers),
        };
        if !m {
            continue;
        }
        matched_any = true;
        match &b.dest {
            Dest::Queue(q) => {
                if let Some(queue) = st.queues.get(q) {
                    if seen_q.insert(q.clone()) {
                        out.queues.push(queue.clone());
                    }
                }
            }
            Dest::Exchange(e) => route_in(st, e, rk, headers, visited, seen_q, out),
        }
    }
    let _ = matched_any;
    if out.queues.len() == before {
        if let Some(ae) = ex.alternate() {
            let ae = ae.to_owned();
            route_in(st, &ae, rk, headers, visited, seen_q, out);
        }
    }
}

/// AMQP topic matching: words split on `.`, `*` matches one word, `#`
/// zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    let p: Vec<&str> = if pattern.is_empty() { Vec::new() } else { p };
    // Dynamic programming over (pattern index, key index).
    let (n, m) = (p.len(), k.len());
    let mut dp = vec![vec![false; m + 1]; n + 1];
    dp[n][m] = true;
    for i in (0..n).rev() {
        for j in (0..=m).rev() {
            dp[i][j] = match p[i] {
                "#" => dp[i + 1][j] || (j < m && dp[i][j + 1]),
                "*" => j < m && dp[i + 1][j + 1],
                w => j < m && k[j] == w && dp[i + 1][j + 1],
            };
        }
    }
    dp[0][0]
}

fn values_equal(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    match (a, b) {
        (Value::LongStr(x) | Value::ByteArray(x), Value::LongStr(y) | Value::ByteArray(y)) => {
            x == y
        }
        _ => a == b,
    }
}

/// Headers exchange matching (`x-match` = `all` (default), `any`,
/// `all-with-x`, `any-with-x`).
pub(crate) fn headers_match(args: &Table, headers: Option<&Table>) -> bool {
    let mode = table_get(args, "x-match")
        .and_then(Value::as_str)
        .unwrap_or("all");
    let (any, with_x) = match mode {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let empty = Vec::new();
    let headers = headers.unwrap_or(&empty);
    let mut considered = 0;
    let mut matched = 0;
    for (k, v) in args {
        if k == "x-match" || (!with_x && k.starts_with("x-")) {
            continue;
        }
        considered += 1;
        let ok = match table_get(headers, k) {
            None => false,
            Some(hv) => matches!(v, Value::Void) || values_equal(v, hv),
        };
        if ok {
            matched += 1;
            if any {
                return true;
            }
        } else if !any {
            return false;
        }
    }
    if any {
        matched > 0
    } else {
        let _ = considered;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "x.y"));
        assert!(topic_matches("#.c", "c"));
        assert!(topic_matches("*.#.z", "a.z"));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("a.b", "a.b.c"));
        assert!(topic_matches("", ""));
    }

    #[test]
    fn headers_modes() {
        let h = vec![
            ("a".to_string(), Value::str("1")),
            ("b".to_string(), Value::I32(2)),
        ];
        let all = vec![
            ("x-match".to_string(), Value::str("all")),
            ("a".into(), Value::str("1")),
            ("b".into(), Value::I64(2)),
        ];
        assert!(headers_match(&all, Some(&h)));
        let all2 = vec![
            ("a".to_string(), Value::str("1")),
            ("c".into(), Value::str("3")),
        ];
        assert!(!headers_match(&all2, Some(&h)));
        let any = vec![
            ("x-match".to_string(), Value::str("any")),
            ("a".into(), Value::str("9")),
            ("b".into(), Value::I32(2)),
        ];
        assert!(headers_match(&any, Some(&h)));
        assert!(!headers_match(&any, None));
    }
}
