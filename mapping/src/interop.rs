//! AMQP 0-9-1 properties <-> MQTT 5 properties: the rule that lets a
//! request/reply application span both protocols.
//!
//! Each protocol keeps storing its own headers, exactly as before this rule
//! existed (so messages already stored read the same, and Kafka consumers,
//! which see the stored headers as they are, see no change). The rule is on
//! the reading side. A message its own protocol wrote (the AMQP handler
//! writes [`amqp::H_EXCHANGE`] on every message, the MQTT handler
//! [`mqtt::H_TOPIC`]) is read from its own headers only, as before. Any
//! other message is read from the other protocol's header first,
//! translated as below, and from the reader's own header where that is
//! absent (e.g. a Kafka record carrying `amqp.content-type`). A header
//! turned into a property is not repeated as an AMQP `headers` entry or an
//! MQTT user property.
//!
//! | concept | AMQP writes | MQTT writes | AMQP consumer of an MQTT message | MQTT 5 subscriber of an AMQP message |
//! | --- | --- | --- | --- | --- |
//! | content type | `amqp.content-type` | `content-type` | `content_type` (if at most 255 bytes; else it stays a `content-type` header) | Content Type |
//! | correlation | `amqp.correlation-id` | `mqtt.correlation-data` (binary) | `correlation_id` if the data is UTF-8 of at most 255 bytes, else the header `x-correlation-id` (long string, the bytes as they are) | Correlation Data = the id's bytes; without one, an `x-correlation-id` header (long string or byte array) |
//! | reply address | `amqp.reply-to` | `mqtt.response-topic` | `reply_to` = the response topic's broker topic name ([`reply_to_for_response_topic`]: `a/b` -> `a.b`) | Response Topic = the MQTT topic of the queue's topic ([`response_topic_for_reply_to`]: `a.b` -> `a/b`), if there is one |
//! | expiry | `amqp.expiration`: ms, counted from `publish_time` | `mqtt.expires-at`: absolute deadline, ms | `expiration` = deadline - `publish_time`, in ms (the interval as published, as RabbitMQ gives it) | Message Expiry Interval = what is left of `publish_time` + expiration, in seconds rounded up |
//!
//! Correlation follows RabbitMQ's MQTT plugin: AMQP 0-9-1's correlation-id
//! is a short string and cannot carry arbitrary bytes, so binary data
//! travels in an `x-correlation-id` header, which an AMQP responder copies
//! into its reply and which the MQTT requester then gets back as
//! Correlation Data.
//!
//! Reply addresses are names of the broker topic that carries the replies.
//! An AMQP responder publishes its reply to the default exchange with the
//! `reply_to` as routing key, i.e. to the queue of that name, whose topic
//! is that name (see [`amqp::queue_topic_name`]); an MQTT responder
//! publishes to the Response Topic, stored in the topic
//! [`mqtt::encode_topic`] of it. Translating through the broker topic name
//! makes both land in the same topic: for names of letters, digits, `-`,
//! `_` and `/` this is RabbitMQ's `/` <-> `.` swap; other characters are
//! escaped as the MQTT topic mapping escapes them (`v1.0/r` ->
//! `v1_2E0.r`), so the translation is reversible. It assumes the AMQP
//! vhost's namespace is the MQTT namespace (both are `public/default`
//! unless configured: vhost `/`). An AMQP reply to an MQTT requester
//! reaches it only if a queue of the `reply_to` name exists (the default
//! exchange routes to queues only).
//!
//! Expiry: AMQP's expiration starts counting when the message is enqueued,
//! which is its `publish_time` in the queue's topic; MQTT's deadline is the
//! acceptance time plus the interval, which is also its `publish_time`
//! plus the interval. So both express one deadline, which both handlers
//! enforce: the AMQP queue dead-letters (or drops) a message whose deadline
//! passed when it reaches the head, and the MQTT handler does not send an
//! expired message (it acknowledges it on the session's cursor). A message
//! dead-lettered by AMQP loses its expiry (as RabbitMQ), whichever
//! protocol published it. Kafka consumers get expired messages like any
//! other (Kafka has no per-message expiry; retention applies).

use crate::{amqp, mqtt};

/// Header carrying correlation data that is not a valid AMQP short string
/// (RabbitMQ's name for it).
pub const H_X_CORRELATION_ID: &str = "x-correlation-id";

/// The AMQP `reply_to` for an MQTT response topic: the name of the broker
/// topic the response topic is stored in, which is also the queue name
/// whose topic that is (`clients/c1/reply` -> `clients.c1.reply`).
pub fn reply_to_for_response_topic(topic: &str) -> String {
    mqtt::encode_topic(topic)
}

/// The MQTT response topic for an AMQP `reply_to`: the MQTT topic stored
/// in the topic of the queue `reply_to` (`amq.gen-Xy` -> `amq/gen-Xy`).
/// `None` when that topic name is not the encoding of an MQTT topic name
/// (a hashed name, or one that decodes to a wildcard or invalid UTF-8).
pub fn response_topic_for_reply_to(reply_to: &str) -> Option<String> {
    let t = mqtt::decode_topic(&amqp::queue_topic_name(reply_to))?;
    mqtt::validate_topic_name(&t).ok()?;
    Some(t)
}

/// Whether `v` can be an AMQP short string property: UTF-8 (the AMQP
/// handler's codec requires it) and at most 255 bytes.
pub(crate) fn as_shortstr(v: &[u8]) -> Option<&str> {
    if v.len() > 255 {
        return None;
    }
    std::str::from_utf8(v).ok()
}

/// Whether `v` can be an MQTT UTF-8 string: at most 65,535 bytes and no
/// U+0000 (MQTT 5 1.5.4).
pub(crate) fn as_mqtt_string(v: &[u8]) -> Option<&str> {
    if v.len() > usize::from(u16::MAX) {
        return None;
    }
    std::str::from_utf8(v).ok().filter(|s| !s.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::Message;
    use bytes::Bytes;

    #[test]
    fn reply_addresses_translate_both_ways() {
        assert_eq!(
            reply_to_for_response_topic("clients/c1/reply"),
            "clients.c1.reply"
        );
        assert_eq!(
            response_topic_for_reply_to("clients.c1.reply").as_deref(),
            Some("clients/c1/reply")
        );
        assert_eq!(
            response_topic_for_reply_to("amq.gen-Xy_z").as_deref(),
            Some("amq/gen-Xy_z")
        );
        assert_eq!(
            response_topic_for_reply_to("replies").as_deref(),
            Some("replies")
        );
        // A dot in an MQTT topic is escaped, and comes back.
        assert_eq!(reply_to_for_response_topic("v1.0/r"), "v1_2E0.r");
        assert_eq!(
            response_topic_for_reply_to("v1_2E0.r").as_deref(),
            Some("v1.0/r")
        );
        // A queue name that is escaped into its topic name still leads to
        // that topic.
        let t = response_topic_for_reply_to("a b").unwrap();
        assert_eq!(mqtt::encode_topic(&t), amqp::queue_topic_name("a b"));
        // Wildcards and hashed names have no response topic.
        assert_eq!(response_topic_for_reply_to("a_2B"), None);
        assert_eq!(response_topic_for_reply_to(&"q.".repeat(125)), None);
    }

    fn amqp_request() -> amqp::AmqpMessage {
        amqp::AmqpMessage {
            exchange: String::new(),
            routing_key: "requests".into(),
            properties: amqp::AmqpProperties {
                content_type: Some("application/json".into()),
                correlation_id: Some("c-1".into()),
                reply_to: Some("rpc.replies".into()),
                expiration: Some("60000".into()),
                ..amqp::AmqpProperties::default()
            },
            body: Bytes::from_static(b"{}"),
        }
    }

    fn mqtt_request() -> mqtt::MqttPublish {
        mqtt::MqttPublish {
            topic: "requests".into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            content_type: Some("application/json".into()),
            response_topic: Some("clients/c1/reply".into()),
            correlation_data: Some(Bytes::from_static(b"c-1")),
            message_expiry: Some(60),
            ..mqtt::MqttPublish::default()
        }
    }

    #[test]
    fn amqp_properties_become_mqtt_properties() {
        let m = amqp::to_message(&amqp_request(), 10_000);
        let p = mqtt::message_to_publish(&m, "requests", 10_000);
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(p.response_topic.as_deref(), Some("rpc/replies"));
        assert_eq!(p.message_expiry, Some(60));
        // What is left, rounded up.
        let later = mqtt::message_to_publish(&m, "requests", 11_500);
        assert_eq!(later.message_expiry, Some(59));
        assert_eq!(mqtt::expires_at(&m), Some(70_000));
        assert!(!mqtt::is_expired(&m, 69_999));
        assert!(mqtt::is_expired(&m, 70_000));
        // The properties are not repeated as user properties.
        let names: Vec<&str> = p.user_properties.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(names, ["amqp.exchange", "amqp.routing-key"]);
    }

    #[test]
    fn mqtt_properties_become_amqp_properties() {
        let m = mqtt::publish_to_message(&mqtt_request(), 10_000);
        let a = amqp::from_message(&m, "requests");
        let p = &a.properties;
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(p.reply_to.as_deref(), Some("clients.c1.reply"));
        assert_eq!(p.expiration.as_deref(), Some("60000"));
        let names: Vec<&str> = p.string_headers.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(names, ["mqtt.topic", "mqtt.qos"]);
        // An AMQP responder's reply to `reply_to` lands in the requester's
        // response topic.
        assert_eq!(
            amqp::queue_topic_name(p.reply_to.as_deref().unwrap()),
            mqtt::encode_topic("clients/c1/reply")
        );
    }

    #[test]
    fn request_reply_round_trips() {
        // MQTT request -> AMQP responder copies correlation-id and answers
        // to reply-to -> the MQTT requester gets its correlation data.
        let req = amqp::from_message(&mqtt::publish_to_message(&mqtt_request(), 0), "q");
        let reply = amqp::AmqpMessage {
            routing_key: req.properties.reply_to.clone().unwrap(),
            properties: amqp::AmqpProperties {
                correlation_id: req.properties.correlation_id.clone(),
                ..amqp::AmqpProperties::default()
            },
            ..amqp::AmqpMessage::default()
        };
        let got = mqtt::message_to_publish(&amqp::to_message(&reply, 0), "x", 0);
        assert_eq!(got.correlation_data.as_deref(), Some(&b"c-1"[..]));
        // AMQP request -> MQTT responder answers on the response topic ->
        // the AMQP requester gets its correlation-id.
        let req = mqtt::message_to_publish(&amqp::to_message(&amqp_request(), 0), "q", 0);
        let reply = mqtt::MqttPublish {
            topic: req.response_topic.clone().unwrap(),
            correlation_data: req.correlation_data.clone(),
            ..mqtt::MqttPublish::default()
        };
        assert_eq!(
            mqtt::encode_topic(&reply.topic),
            amqp::queue_topic_name("rpc.replies")
        );
        let got = amqp::from_message(&mqtt::publish_to_message(&reply, 0), "rpc.replies");
        assert_eq!(got.properties.correlation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn binary_correlation_data_travels_as_x_correlation_id() {
        let mut p = mqtt_request();
        p.correlation_data = Some(Bytes::from_static(b"\x00\xffid"));
        let a = amqp::from_message(&mqtt::publish_to_message(&p, 0), "q");
        assert_eq!(a.properties.correlation_id, None);
        let x: Vec<_> = a
            .properties
            .string_headers
            .iter()
            .filter(|(n, _)| n == H_X_CORRELATION_ID || n == mqtt::H_CORRELATION_DATA)
            .collect();
        assert_eq!(
            x,
            [&(
                H_X_CORRELATION_ID.to_owned(),
                Bytes::from_static(b"\x00\xffid")
            )]
        );
        // An AMQP reply carrying it back as a header.
        let reply = amqp::AmqpMessage {
            properties: amqp::AmqpProperties {
                string_headers: a.properties.string_headers.clone(),
                ..amqp::AmqpProperties::default()
            },
            ..amqp::AmqpMessage::default()
        };
        let stored = amqp::to_message(&reply, 0);
        // The copied `mqtt.topic` entry does not make the reply MQTT's.
        assert_eq!(stored.header(mqtt::H_TOPIC), None);
        let got = mqtt::message_to_publish(&stored, "x", 0);
        assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00\xffid"[..]));
        assert!(got
            .user_properties
            .iter()
            .all(|(n, _)| n != H_X_CORRELATION_ID));
    }

    #[test]
    fn same_protocol_messages_are_unchanged() {
        // An AMQP user header `content-type` is not the AMQP content type.
        let mut m = amqp_request();
        m.properties.content_type = None;
        m.properties.string_headers = vec![("content-type".into(), Bytes::from_static(b"x"))];
        let back = amqp::from_message(&amqp::to_message(&m, 0), "q");
        assert_eq!(back.properties.content_type, None);
        // An MQTT user property `x-correlation-id` is not correlation data.
        let mut p = mqtt_request();
        p.correlation_data = None;
        p.user_properties = vec![(H_X_CORRELATION_ID.into(), "u".into())];
        let back = mqtt::message_to_publish(&mqtt::publish_to_message(&p, 0), "x", 0);
        assert_eq!(back.correlation_data, None);
        assert_eq!(back.user_properties, p.user_properties);
    }

    #[test]
    fn untranslatable_values_stay_headers() {
        let mut p = mqtt_request();
        p.content_type = Some("t".repeat(300));
        let a = amqp::from_message(&mqtt::publish_to_message(&p, 0), "q");
        assert_eq!(a.properties.content_type, None);
        assert!(a
            .properties
            .string_headers
            .iter()
            .any(|(n, v)| n == mqtt::H_CONTENT_TYPE && v.len() == 300));
        let mut m = amqp_request();
        m.properties.reply_to = Some("a_2B".into());
        let q = mqtt::message_to_publish(&amqp::to_message(&m, 0), "q", 0);
        assert_eq!(q.response_topic, None);
        assert!(q
            .user_properties
            .contains(&(amqp::H_REPLY_TO.to_owned(), "a_2B".to_owned())));
    }

    #[test]
    fn expiry_from_other_protocols() {
        // A Kafka record (neither protocol's) with an AMQP expiration
        // header expires for MQTT too.
        let mut k = Message::new(&b"x"[..]);
        k.publish_time = 1_000;
        k.headers
            .push((amqp::H_EXPIRATION.into(), Bytes::from_static(b"500")));
        assert_eq!(mqtt::expires_at(&k), Some(1_500));
        assert_eq!(
            mqtt::message_to_publish(&k, "t", 1_001).message_expiry,
            Some(1)
        );
        // An AMQP queue's reading of an MQTT deadline.
        let m = mqtt::publish_to_message(&mqtt_request(), 5_000);
        assert_eq!(mqtt::expires_at(&m), Some(65_000));
        let a = amqp::from_message(&m, "q");
        assert_eq!(a.properties.expiration.as_deref(), Some("60000"));
    }

    #[test]
    fn deliverable_agrees_with_is_expired() {
        // An MQTT message with a v5 expiry, a Kafka record with an AMQP
        // expiration and one with neither, before and at their deadlines.
        let mqtt_msg = mqtt::publish_to_message(&mqtt_request(), 5_000);
        let mut k = Message::new(&b"x"[..]);
        k.publish_time = 1_000;
        k.headers
            .push((amqp::H_EXPIRATION.into(), Bytes::from_static(b"500")));
        let plain = Message::new(&b"y"[..]);
        for m in [&mqtt_msg, &k, &plain] {
            for now in [0, 1_499, 1_500, 64_999, 65_000, i64::MAX] {
                let d = mqtt::deliverable(m, "t", now);
                assert_eq!(d.is_none(), mqtt::is_expired(m, now), "at {now}");
                if let Some(d) = d {
                    assert_eq!(d, mqtt::message_to_publish(m, "t", now));
                }
            }
        }
        assert!(mqtt::deliverable(&mqtt_msg, "t", 64_999).is_some());
        assert!(mqtt::deliverable(&mqtt_msg, "t", 65_000).is_none());
        assert!(mqtt::deliverable(&plain, "t", i64::MAX).is_some());
    }

    #[test]
    fn string_limits() {
        assert_eq!(as_shortstr(b"abc"), Some("abc"));
        assert_eq!(as_shortstr(&[b'a'; 256]), None);
        assert_eq!(as_shortstr(b"\xff"), None);
        assert_eq!(as_mqtt_string(b"a\0"), None);
        assert_eq!(as_mqtt_string("é".as_bytes()), Some("é"));
    }
}
