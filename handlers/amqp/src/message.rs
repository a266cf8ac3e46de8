//! A routed AMQP message in memory, and its conversion to and from the
//! broker's [`Message`] through `mapping::amqp`.

use bytes::{Bytes, BytesMut};
use mapping::amqp::{AmqpMessage, AmqpProperties};

use crate::codec::{decode_table, encode_table, table_get, BasicProperties, Table, Value};
use broker::Message;

/// One message as the handler routes and delivers it.
#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) props: BasicProperties,
    pub(crate) body: Bytes,
    /// When it was appended to the queue it is read from (ms).
    pub(crate) publish_time: i64,
}

impl Msg {
    /// The AMQP view of a stored message (any protocol).
    pub(crate) fn from_core(m: &Message, queue: &str) -> Msg {
        let a = mapping::amqp::from_message(m, queue);
        let p = a.properties;
        let headers = match p.headers_table {
            Some(t) => decode_table(t).ok(),
            None if p.string_headers.is_empty() => None,
            None => Some(
                p.string_headers
                    .into_iter()
                    .map(|(n, v)| (n, Value::LongStr(v)))
                    .collect(),
            ),
        };
        Msg {
            exchange: a.exchange,
            routing_key: a.routing_key,
            props: BasicProperties {
                content_type: p.content_type,
                content_encoding: p.content_encoding,
                headers,
                delivery_mode: p.delivery_mode,
                priority: p.priority,
                correlation_id: p.correlation_id,
                reply_to: p.reply_to,
                expiration: p.expiration,
                message_id: p.message_id,
                timestamp: p.timestamp,
                kind: p.kind,
                user_id: p.user_id,
                app_id: p.app_id,
                cluster_id: p.cluster_id,
            },
            body: a.body,
            publish_time: m.publish_time,
        }
    }

    /// The broker message to store.
    pub(crate) fn to_core(&self, now_ms: i64) -> Message {
        let p = &self.props;
        let (headers_table, string_headers) = match &p.headers {
            None => (None, Vec::new()),
            Some(t) => {
                let mut b = BytesMut::new();
                encode_table(&mut b, t);
                let strings = t
                    .iter()
                    .filter_map(|(n, v)| match v {
                        Value::LongStr(s) | Value::ByteArray(s) => Some((n.clone(), s.clone())),
                        _ => None,
                    })
                    .collect();
                (Some(b.freeze()), strings)
            }
        };
        mapping::amqp::to_message(
            &AmqpMessage {
                exchange: self.exchange.clone(),
                routing_key: self.routing_key.clone(),
                properties: AmqpProperties {
                    content_type: p.content_type.clone(),
                    content_encoding: p.content_encoding.clone(),
                    headers_table,
                    string_headers,
                    delivery_mode: p.delivery_mode,
                    priority: p.priority,
                    correlation_id: p.correlation_id.clone(),
                    reply_to: p.reply_to.clone(),
                    expiration: p.expiration.clone(),
                    message_id: p.message_id.clone(),
                    timestamp: p.timestamp,
                    kind: p.kind.clone(),
                    user_id: p.user_id.clone(),
                    app_id: p.app_id.clone(),
                    cluster_id: p.cluster_id.clone(),
                },
                body: self.body.clone(),
            },
            now_ms,
        )
    }

    /// The per-message TTL in ms, if the expiration property is valid.
    pub(crate) fn message_ttl(&self) -> Option<u64> {
        self.props
            .expiration
            .as_deref()
            .and_then(|s| s.parse().ok())
    }

    /// When the message expires in a queue with `queue_ttl`.
    pub(crate) fn expires_at(&self, queue_ttl: Option<u64>) -> Option<i64> {
        let ttl = match (queue_ttl, self.message_ttl()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(
            self.publish_time
                .saturating_add(ttl.min(i64::MAX as u64) as i64),
        )
    }

    /// Size counted against prefetch-size limits.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
    }

    /// The message as dead-lettered from `queue` for `reason`, with its
    /// `x-death` header updated as RabbitMQ does. `None` if the message
    /// has already been dead-lettered from this queue for the same
    /// automatic reason (a cycle, which RabbitMQ drops).
    pub(crate) fn dead_lettered(
        &self,
        queue: &str,
        reason: &str,
        dlx: &str,
        dlrk: Option<&str>,
        now_secs: u64,
    ) -> Option<Msg> {
        let mut m = self.clone();
        let mut headers: Table = m.props.headers.take().unwrap_or_default();
        let mut deaths: Vec<Value> = match table_get(&headers, "x-death") {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        let same = |t: &Table| {
            table_get(t, "queue").and_then(Value::as_str) == Some(queue)
                && table_get(t, "reason").and_then(Value::as_str) == Some(reason)
        };
        let existing = deaths
            .iter()
            .position(|d| matches!(d, Value::Table(t) if same(t)));
        if existing.is_some() && reason != "rejected" {
            return None;
        }
        let mut entry = match existing.map(|i| deaths.remove(i)) {
            Some(Value::Table(mut t)) => {
                let c = table_get(&t, "count").and_then(Value::as_i64).unwrap_or(0);
                t.retain(|(k, _)| k != "count" && k != "time");
                t.push(("count".into(), Value::I64(c + 1)));
                t.push(("time".into(), Value::Timestamp(now_secs)));
                t
            }
            _ => {
                let mut t: Table = vec![
                    ("count".into(), Value::I64(1)),
                    ("reason".into(), Value::str(reason)),
                    ("queue".into(), Value::str(queue)),
                    ("time".into(), Value::Timestamp(now_secs)),
                    ("exchange".into(), Value::str(&self.exchange)),
                    (
                        "routing-keys".into(),
                        Value::Array(vec![Value::str(&self.routing_key)]),
                    ),
                ];
                if let Some(e) = &self.props.expiration {
                    t.push(("original-expiration".into(), Value::str(e)));
                }
                t
            }
        };
        entry.sort_by(|a, b| a.0.cmp(&b.0));
        deaths.insert(0, Value::Table(entry));
        headers.retain(|(k, _)| k != "x-death");
        if table_get(&headers, "x-first-death-reason").is_none() {
            headers.push(("x-first-death-reason".into(), Value::str(reason)));
            headers.push(("x-first-death-queue".into(), Value::str(queue)));
            headers.push(("x-first-death-exchange".into(), Value::str(&self.exchange)));
        }
        headers.push(("x-death".into(), Value::Array(deaths)));
        m.props.headers = Some(headers);
        // The per-message TTL does not follow the message (RabbitMQ keeps
        // it as `original-expiration`), so it cannot expire again at once.
        m.props.expiration = None;
        m.exchange = dlx.to_owned();
        if let Some(rk) = dlrk {
            m.routing_key = rk.to_owned();
        }
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_round_trip_keeps_properties() {
        let m = Msg {
            exchange: "x".into(),
            routing_key: "k".into(),
            props: BasicProperties {
                content_type: Some("application/json".into()),
                headers: Some(vec![
                    ("n".into(), Value::I32(5)),
                    ("s".into(), Value::str("v")),
                ]),
                delivery_mode: Some(2),
                expiration: Some("1000".into()),
                ..BasicProperties::default()
            },
            body: Bytes::from_static(b"{}"),
            publish_time: 7,
        };
        let core = m.to_core(7);
        assert_eq!(core.header("s").map(|v| &v[..]), Some(&b"v"[..]));
        let back = Msg::from_core(&core, "q");
        assert_eq!(back.props, m.props);
        assert_eq!(back.routing_key, "k");
        assert_eq!(back.expires_at(Some(500)), Some(507));
    }

    #[test]
    fn mqtt_expiry_is_the_queue_deadline_and_not_dead_lettered() {
        let p = mapping::mqtt::MqttPublish {
            topic: "q".into(),
            message_expiry: Some(2),
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let core = mapping::mqtt::publish_to_message(&p, 1_000);
        let m = Msg::from_core(&core, "q");
        assert_eq!(m.props.expiration.as_deref(), Some("2000"));
        assert_eq!(m.props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.expires_at(None), Some(3_000));
        assert_eq!(m.expires_at(Some(500)), Some(1_500));
        // Dead-lettered, it no longer expires, whoever published it.
        let d = m.dead_lettered("q", "expired", "dlx", None, 1).unwrap();
        let again = Msg::from_core(&d.to_core(5_000), "dlq");
        assert_eq!(again.props.expiration, None);
        assert_eq!(again.expires_at(None), None);
        assert_eq!(again.props.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn x_death_counts_and_cycles() {
        let m = Msg {
            exchange: "x".into(),
            routing_key: "k".into(),
            props: BasicProperties::default(),
            body: Bytes::new(),
            publish_time: 0,
        };
        let d1 = m.dead_lettered("q", "rejected", "dlx", None, 1).unwrap();
        let d2 = d1.dead_lettered("q", "rejected", "dlx", None, 2).unwrap();
        let h = d2.props.headers.unwrap();
        let Some(Value::Array(deaths)) = table_get(&h, "x-death") else {
            panic!()
        };
        assert_eq!(deaths.len(), 1);
        let Value::Table(t) = &deaths[0] else {
            panic!()
        };
        assert_eq!(table_get(t, "count").and_then(Value::as_i64), Some(2));
        let e = m.dead_lettered("q", "expired", "dlx", None, 1).unwrap();
        assert!(e.dead_lettered("q", "expired", "dlx", None, 1).is_none());
    }
}
