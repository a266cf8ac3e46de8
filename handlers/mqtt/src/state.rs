//! State shared by every connection of the handler: the known topics of
//! the namespace, retained messages, the session registry, and the
//! background tasks (topic scan, session expiry).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use broker::message::{encode_batch, now_ms};
use broker::{
    AppendEntry, Broker, BrokerError, EntryFormat, InitialPosition, Ledger, Message, NamespaceName,
    TopicName,
};
use bytes::Bytes;
use handler_api::{CancellationToken, HandlerContext, HandlerError};
use mapping::mqtt::{self as map, MqttPublish};
use mapping::names::NamespaceMapping;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use crate::MqttConfig;

/// A broker topic of the namespace that MQTT can see.
#[derive(Debug)]
pub(crate) struct KnownTopic {
    pub(crate) name: TopicName,
    /// The MQTT topic it holds.
    pub(crate) mqtt: Arc<str>,
    pub(crate) partitions: u32,
}

/// A retained message.
#[derive(Debug, Clone)]
pub(crate) struct Retained {
    pub(crate) msg: Message,
}

/// One subscription of a session, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SubRecord {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    #[serde(default)]
    pub(crate) nl: bool,
    #[serde(default)]
    pub(crate) rap: bool,
    #[serde(default)]
    pub(crate) rh: u8,
    #[serde(default)]
    pub(crate) id: Option<u32>,
    /// When it was made (ms since the epoch): topics that appear later are
    /// read from this time on.
    pub(crate) since_ms: i64,
}

/// What is persisted of a session.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct SessionRecord {
    pub(crate) expiry: u32,
    pub(crate) subs: Vec<SubRecord>,
    #[serde(default)]
    pub(crate) disconnected_ms: i64,
    /// Outgoing QoS 2 packet ids whose PUBREC arrived (PUBREL owed).
    #[serde(default)]
    pub(crate) pubrel: Vec<u16>,
    /// Incoming QoS 2 packet ids whose message is stored and whose PUBREL
    /// has not come yet: a PUBLISH resent with one of them after a restart
    /// is not stored again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) qos2_in: Vec<u16>,
    /// The will of the session's connection: while it is online (so that
    /// a crash of the gateway, which ends the connection without a
    /// DISCONNECT, still publishes it after the restart), and while it
    /// waits for its delay after the connection ended (boxed: every
    /// connection holds a record, few hold a will).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) will: Option<Box<StoredWill>>,
}

/// A will as persisted with its session: published at `at_ms` unless the
/// session is resumed first; or, stored while its connection is online,
/// published `online_delay` seconds after the restart that follows a crash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StoredWill {
    pub(crate) at_ms: i64,
    /// Set while the connection is online: its will delay (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) online_delay: Option<u32>,
    pub(crate) topic: String,
    /// Hex.
    pub(crate) payload: String,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    #[serde(default)]
    pub(crate) payload_format: Option<u8>,
    #[serde(default)]
    pub(crate) message_expiry: Option<u32>,
    #[serde(default)]
    pub(crate) content_type: Option<String>,
    #[serde(default)]
    pub(crate) response_topic: Option<String>,
    /// Hex.
    #[serde(default)]
    pub(crate) correlation_data: Option<String>,
    #[serde(default)]
    pub(crate) user_properties: Vec<(String, String)>,
}

impl StoredWill {
    /// The will of a connection that is online: the gateway's crash ends
    /// the connection, so the restart publishes it after `delay` seconds.
    pub(crate) fn online(w: &MqttPublish, delay: u32) -> StoredWill {
        StoredWill {
            online_delay: Some(delay),
            ..StoredWill::new(w, 0)
        }
    }

    pub(crate) fn new(w: &MqttPublish, at_ms: i64) -> StoredWill {
        StoredWill {
            at_ms,
            online_delay: None,
            topic: w.topic.clone(),
            payload: hex(&w.payload),
            qos: w.qos,
            retain: w.retain,
            payload_format: w.payload_format,
            message_expiry: w.message_expiry,
            content_type: w.content_type.clone(),
            response_topic: w.response_topic.clone(),
            correlation_data: w.correlation_data.as_deref().map(hex),
            user_properties: w.user_properties.clone(),
        }
    }

    /// The will again; `None` if the record was damaged.
    pub(crate) fn publish(&self, client_id: &str) -> Option<MqttPublish> {
        Some(MqttPublish {
            topic: self.topic.clone(),
            payload: unhex(&self.payload)?.into(),
            qos: self.qos.min(2),
            retain: self.retain,
            client_id: Some(client_id.to_owned()),
            payload_format: self.payload_format,
            message_expiry: self.message_expiry,
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: match &self.correlation_data {
                Some(h) => Some(unhex(h)?.into()),
                None => None,
            },
            user_properties: self.user_properties.clone(),
        })
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(D[usize::from(x >> 4)]));
        s.push(char::from(D[usize::from(x & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let d = |c: u8| char::from(c).to_digit(16).map(|v| v as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
        .collect()
}

/// Key of a feed: one partition of one topic.
pub(crate) type FeedKey = Arc<(TopicName, u32)>;

/// A session's state while no connection owns it (and what a connection
/// takes over).
#[derive(Debug, Default)]
pub(crate) struct Session {
    pub(crate) record: SessionRecord,
    /// Outgoing QoS 1/2 messages that were sent but not acknowledged when
    /// the last connection ended: redelivered with DUP and the same id.
    pub(crate) redeliver: HashMap<(FeedKey, u64), u16>,
    /// Incoming QoS 2 packet ids awaiting PUBREL, including those whose
    /// append is still pending (the record's `qos2_in` has only the
    /// stored ones).
    pub(crate) qos2_in: std::collections::HashSet<u16>,
}

#[derive(Debug)]
pub(crate) struct Online {
    pub(crate) conn_id: u64,
    pub(crate) kick: CancellationToken,
    /// Cancelled when the connection has released the session.
    pub(crate) gone: CancellationToken,
    /// The connection asked for a clean start: the session it took over
    /// ended, and with it any will still waiting for its delay.
    pub(crate) clean_start: bool,
}

/// A will waiting for its delay.
#[derive(Debug)]
pub(crate) struct PendingWill {
    pub(crate) task: AbortHandle,
    pub(crate) will: MqttPublish,
}

#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) online: Option<Online>,
    pub(crate) stored: Option<Box<Session>>,
    /// Offline persistent sessions expire at this time (ms).
    pub(crate) expires_at_ms: Option<i64>,
    /// A delayed will waiting to be published.
    pub(crate) will: Option<PendingWill>,
}

/// Everything the handler's connections share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: MqttConfig,
    pub(crate) broker: Arc<Broker>,
    pub(crate) ns: NamespaceMapping,
    pub(crate) topics: RwLock<HashMap<String, Arc<KnownTopic>>>,
    pub(crate) new_topics: broadcast::Sender<Arc<KnownTopic>>,
    pub(crate) retained: RwLock<HashMap<String, Retained>>,
    retained_ledger: Arc<Ledger>,
    sessions_ledger: Arc<Ledger>,
    pub(crate) sessions: Mutex<HashMap<Arc<str>, Slot>>,
    /// Shared subscription groups with connected members, by
    /// `<group>/<filter>`.
    pub(crate) groups: Mutex<HashMap<String, Arc<crate::share::Group>>>,
    pub(crate) conn_ids: AtomicU64,
    /// Messages published and delivered, by QoS (handles made once: a
    /// `counter!` per message looks its key up in the registry).
    published: [metrics::Counter; 3],
    pub(crate) delivered: [metrics::Counter; 3],
}

/// One counter per QoS.
fn per_qos(name: &'static str) -> [metrics::Counter; 3] {
    [0, 1, 2].map(|q| metrics::counter!(name, "qos" => qos_label(q)))
}

/// The counter of QoS `q` among `per_qos`'s.
pub(crate) fn of_qos(counters: &[metrics::Counter; 3], q: u8) -> &metrics::Counter {
    &counters[usize::from(q.min(2))]
}

/// The topic a connection published to last and its ledger: a connection
/// that keeps publishing to one topic skips the name mapping and lookups.
pub(crate) type LastLedger = Option<(String, Arc<Ledger>)>;

const RETAINED_TOPIC: &str = "retained";
const SESSIONS_TOPIC: &str = "sessions";
const SESSION_PROP: &str = "mqtt.session";

fn to_handler(e: BrokerError) -> HandlerError {
    HandlerError::Broker(e)
}

impl Shared {
    pub(crate) async fn start(
        config: MqttConfig,
        ctx: HandlerContext,
    ) -> Result<Arc<Shared>, HandlerError> {
        let broker = ctx.broker.clone();
        let ns = map::namespace(&config.tenant, &config.namespace).map_err(to_handler)?;
        let sys =
            NamespaceName::new(&config.tenant, &config.system_namespace).map_err(to_handler)?;
        broker
            .ensure_namespace(&ns.namespace)
            .await
            .map_err(to_handler)?;
        broker.ensure_namespace(&sys).await.map_err(to_handler)?;
        let system_ledger = |t: &str| {
            let name = TopicName::new(sys.clone(), t);
            let broker = broker.clone();
            async move {
                let name = name.map_err(to_handler)?;
                if broker.topic(&name).is_none() {
                    match broker
                        .create_topic(
                            &name,
                            1,
                            broker::TopicConfig {
                                // Kept until compacted by the handler, whatever the
                                // namespace's retention says.
                                retention_ms: Some(-1),
                                retention_bytes: Some(-1),
                            },
                        )
                        .await
                    {
                        Ok(_) | Err(BrokerError::AlreadyExists(_)) => {}
                        Err(e) => return Err(to_handler(e)),
                    }
                }
                broker.ledger(&name, 0).map_err(to_handler)
            }
        };
        let retained_ledger = system_ledger(RETAINED_TOPIC).await?;
        let sessions_ledger = system_ledger(SESSIONS_TOPIC).await?;
        let (new_topics, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            config,
            broker,
            ns,
            topics: RwLock::new(HashMap::new()),
            new_topics,
            retained: RwLock::new(HashMap::new()),
            retained_ledger,
            sessions_ledger,
            sessions: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            conn_ids: AtomicU64::new(1),
            published: per_qos("manifold_mqtt_messages_published_total"),
            delivered: per_qos("manifold_mqtt_messages_delivered_total"),
        });
        shared.load_retained().await?;
        for (client_id, will, at_ms, ended) in shared.load_sessions() {
            if ended {
                shared.publish_ended_session_will(client_id, will);
                continue;
            }
            let Some(will) = will else { continue };
            let delay = Duration::from_millis(u64::try_from(at_ms - now_ms()).unwrap_or(0));
            shared.schedule_will(&client_id, will, delay);
        }
        shared.scan_topics().await;
        tokio::spawn(background(Arc::downgrade(&shared), ctx.shutdown.clone()));
        Ok(shared)
    }

    pub(crate) async fn drain(&self) {
        self.broker.persist_cursors().await;
    }

    // ---- topics ----

    /// Syncs the known topics with the namespace's topic list.
    pub(crate) async fn scan_topics(&self) {
        let metas = self.broker.topics(&self.ns.namespace);
        let mut present = std::collections::HashSet::with_capacity(metas.len());
        for m in metas {
            present.insert(m.name.topic.clone());
            let known = self
                .topics
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&m.name.topic)
                .map(|k| k.partitions);
            if known == Some(m.partitions) {
                continue;
            }
            let mqtt = match map::decode_topic(&m.name.topic) {
                Some(t) => Some(t),
                None if m.name.topic.len() == map::HASHED_LEN => {
                    self.topic_from_header(&m.name).await
                }
                None => None,
            };
            if let Some(mqtt) = mqtt {
                self.add_topic(m.name.clone(), mqtt.into(), m.partitions);
            }
        }
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| present.contains(k));
    }

    async fn topic_from_header(&self, name: &TopicName) -> Option<String> {
        let l = self.broker.ledger(name, 0).ok()?;
        let entries = l.read(l.start_offset(), 1).await.ok()?;
        let e = entries.first()?;
        let msgs = mapping::entry_messages(e).ok()?;
        msgs.first().and_then(map::message_topic).map(str::to_owned)
    }

    /// Registers a topic (new or with more partitions) and tells the
    /// connections.
    pub(crate) fn add_topic(
        &self,
        name: TopicName,
        mqtt: Arc<str>,
        partitions: u32,
    ) -> Arc<KnownTopic> {
        let k = Arc::new(KnownTopic {
            name: name.clone(),
            mqtt,
            partitions,
        });
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.topic.clone(), k.clone());
        let _ = self.new_topics.send(k.clone());
        k
    }

    pub(crate) fn known_topics(&self) -> Vec<Arc<KnownTopic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Appends an MQTT publish to its topic (creating it), and records it
    /// as retained when asked. Completes once durable.
    /// Queues a non-retained publish (see [`broker::Ledger::submit`]):
    /// returns once it is queued on its topic's ledger, in order after
    /// what this caller queued before, with the append to await for
    /// durability.
    ///
    /// `last` is the caller's [`LastLedger`]: used when `p` goes to the
    /// same topic, looked up again if that ledger was closed meanwhile (the
    /// topic deleted), and set to this publish's topic.
    pub(crate) async fn submit_publish(
        &self,
        p: &MqttPublish,
        last: &mut LastLedger,
    ) -> Result<broker::PendingAppend, BrokerError> {
        debug_assert!(!p.retain);
        let entry = publish_entry(p);
        let cached = last.as_ref().filter(|(t, _)| *t == p.topic);
        let pending = match cached {
            Some((_, l)) => match l.submit(entry.clone()).await {
                Err(BrokerError::Closed) => None,
                r => Some(r?),
            },
            None => None,
        };
        let pending = match pending {
            Some(p) => p,
            None => {
                *last = None;
                let ledger = self.publish_ledger(&p.topic).await?;
                let pending = ledger.submit(entry).await?;
                *last = Some((p.topic.clone(), ledger));
                pending
            }
        };
        of_qos(&self.published, p.qos).increment(1);
        Ok(pending)
    }

    /// [`Shared::submit_publish`] without waiting, for a publish to the
    /// topic of `last` (the caller's last ledger): `None` when it would wait
    /// (for room on the ledger, or to look the topic up or create it), or
    /// that ledger closed; then use `submit_publish`.
    pub(crate) fn try_submit_publish(
        &self,
        p: &MqttPublish,
        last: &LastLedger,
    ) -> Option<Result<broker::PendingAppend, BrokerError>> {
        debug_assert!(!p.retain);
        let (_, ledger) = last.as_ref().filter(|(t, _)| *t == p.topic)?;
        match ledger.try_submit(publish_entry(p)) {
            Ok(Err(BrokerError::Closed)) | Err(_) => None,
            Ok(r) => {
                if r.is_ok() {
                    of_qos(&self.published, p.qos).increment(1);
                }
                Some(r)
            }
        }
    }

    /// The ledger an MQTT topic is published to, creating the topic on
    /// first use, and again if it was deleted (admin API, another
    /// protocol) since.
    async fn publish_ledger(&self, topic: &str) -> Result<Arc<broker::Ledger>, BrokerError> {
        let name = map::broker_topic(&self.ns, topic)?;
        let known = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&name.topic);
        if known {
            match self.broker.ledger(&name, 0) {
                Err(BrokerError::TopicNotFound(_)) => {}
                r => return r,
            }
        }
        let meta = self.broker.ensure_topic(&name).await?;
        self.add_topic(name.clone(), topic.into(), meta.partitions);
        self.broker.ledger(&name, 0)
    }

    pub(crate) async fn publish(&self, p: &MqttPublish) -> Result<(), BrokerError> {
        let now = now_ms();
        let msg = map::publish_to_message(p, now);
        let ledger = self.publish_ledger(&p.topic).await?;
        append(&ledger, &msg, now).await?;
        of_qos(&self.published, p.qos).increment(1);
        if p.retain {
            self.set_retained(&p.topic, msg).await?;
        }
        Ok(())
    }

    // ---- retained ----

    async fn load_retained(&self) -> Result<(), HandlerError> {
        let l = &self.retained_ledger;
        let mut from = l.start_offset();
        let end = l.end_offset();
        let mut map: HashMap<String, Retained> = HashMap::new();
        while from < end {
            let entries = l.read(from, 1 << 20).await.map_err(to_handler)?;
            if entries.is_empty() {
                break;
            }
            for e in &entries {
                from = e.base_offset + u64::from(e.count);
                let Ok(msgs) = mapping::entry_messages(e) else {
                    tracing::warn!(offset = e.base_offset, "skipping unreadable retained entry");
                    continue;
                };
                for m in msgs {
                    let Some(t) = map::message_topic(&m).map(str::to_owned) else {
                        continue;
                    };
                    if m.payload.is_empty() {
                        map.remove(&t);
                    } else {
                        map.insert(t, Retained { msg: m });
                    }
                }
            }
        }
        tracing::info!(retained = map.len(), "loaded retained messages");
        *self.retained.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    async fn set_retained(&self, topic: &str, msg: Message) -> Result<(), BrokerError> {
        append(&self.retained_ledger, &msg, msg.publish_time).await?;
        let count = {
            let mut r = self.retained.write().unwrap_or_else(|e| e.into_inner());
            if msg.payload.is_empty() {
                r.remove(topic);
            } else {
                r.insert(topic.to_owned(), Retained { msg });
            }
            r.len() as u64
        };
        // Compact: when the log holds far more than the live set, append
        // the live set again and trim everything before it.
        let l = &self.retained_ledger;
        let stored = l.end_offset() - l.start_offset();
        if stored > 1024 + 4 * count {
            let live: Vec<Message> = self
                .retained
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|r| r.msg.clone())
                .collect();
            let before = l.end_offset();
            for chunk in live.chunks(256) {
                let now = now_ms();
                l.append(AppendEntry {
                    format: EntryFormat::Messages,
                    count: chunk.len() as u32,
                    first_timestamp: now,
                    max_timestamp: now,
                    payload: encode_batch(chunk),
                })
                .await?;
            }
            l.trim(before).await?;
        }
        Ok(())
    }

    /// Retained messages whose topic matches `filter`.
    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<Message> {
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| map::topic_matches(filter, t))
            .map(|(_, r)| r.msg.clone())
            .collect()
    }

    // ---- sessions ----

    /// Loads the persistent sessions; returns the wills they hold (client
    /// id, will, when to publish it, and whether the record is only the
    /// will of a clean session that was online at the crash: the session
    /// itself ended with its connection).
    fn load_sessions(&self) -> Vec<(Arc<str>, Option<MqttPublish>, i64, bool)> {
        let mut wills = Vec::new();
        let l = &self.sessions_ledger;
        let now = now_ms();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for name in l.cursor_names() {
            let Some(c) = l.cursor(&name) else { continue };
            let Some(rec) = c
                .property(SESSION_PROP)
                .and_then(|s| serde_json::from_str::<SessionRecord>(&s).ok())
            else {
                continue;
            };
            let ended = rec.expiry == 0;
            let mut will_pushed = false;
            if let Some(w) = &rec.will {
                // The connection was online at the crash: its will delay
                // (no longer than the session) counts from the restart.
                let at_ms = w
                    .online_delay
                    .map_or(w.at_ms, |d| now + i64::from(d.min(rec.expiry)) * 1000);
                match w.publish(name.as_str()) {
                    Some(p) => {
                        wills.push((name.as_str().into(), Some(p), at_ms, ended));
                        will_pushed = true;
                    }
                    None => {
                        tracing::warn!(client_id = name.as_str(), "damaged stored will dropped")
                    }
                }
            }
            if ended {
                // A session that ended with its connection: nothing to
                // resume; its record goes (after its will, if any).
                if !will_pushed {
                    wills.push((name.as_str().into(), None, now, true));
                }
                continue;
            }
            let disconnected = if rec.disconnected_ms > 0 {
                rec.disconnected_ms
            } else {
                now
            };
            sessions.insert(
                name.as_str().into(),
                Slot {
                    online: None,
                    expires_at_ms: expiry_deadline(rec.expiry, disconnected),
                    stored: Some(Box::new(Session {
                        qos2_in: rec.qos2_in.iter().copied().collect(),
                        record: rec,
                        ..Session::default()
                    })),
                    will: None,
                },
            );
        }
        tracing::info!(
            sessions = sessions.len(),
            wills = wills.len(),
            "loaded persistent MQTT sessions"
        );
        wills
    }

    /// Persists a session record (durably, before returning).
    pub(crate) async fn store_session(
        &self,
        client_id: &str,
        rec: &SessionRecord,
    ) -> Result<(), BrokerError> {
        let json =
            serde_json::to_string(rec).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let c = self
            .sessions_ledger
            .open_cursor(client_id, InitialPosition::Latest)
            .await?;
        c.set_property(SESSION_PROP, &json);
        self.sessions_ledger.persist_cursors().await
    }

    /// Deletes a session's record and every cursor it holds.
    pub(crate) async fn delete_session_state(&self, client_id: &str) {
        let _ = self.sessions_ledger.delete_cursor(client_id).await;
        self.delete_cursor_on_topics(&map::session_cursor_name(client_id), |_| true)
            .await;
    }

    /// Deletes the cursor `name` from every partition of the known topics
    /// that `which` selects.
    pub(crate) async fn delete_cursor_on_topics(
        &self,
        name: &str,
        which: impl Fn(&KnownTopic) -> bool,
    ) {
        for k in self.known_topics().iter().filter(|k| which(k)) {
            for p in 0..k.partitions {
                if let Ok(l) = self.broker.ledger(&k.name, p) {
                    if l.cursor(name).is_some() {
                        let _ = l.delete_cursor(name).await;
                    }
                }
            }
        }
    }

    async fn expire_sessions(self: &Arc<Self>) {
        let now = now_ms();
        let mut shared_filters = Vec::new();
        let expired: Vec<Arc<str>> = {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<Arc<str>> = s
                .iter()
                .filter(|(_, slot)| {
                    slot.online.is_none() && slot.expires_at_ms.is_some_and(|t| t <= now)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for id in &ids {
                if let Some(stored) = s.remove(id).and_then(|slot| slot.stored) {
                    shared_filters.extend(
                        stored
                            .record
                            .subs
                            .iter()
                            .filter(|r| matches!(map::parse_shared(&r.filter), Ok(Some(_))))
                            .map(|r| r.filter.clone()),
                    );
                }
            }
            ids
        };
        for id in expired {
            tracing::debug!(client_id = %id, "session expired");
            self.delete_session_state(&id).await;
        }
        // A shared subscription ends with the last session that holds it.
        for f in shared_filters {
            self.forget_shared_if_unheld(&f).await;
        }
    }

    /// Publishes a will after `delay` unless the client reconnects
    /// first (the slot's `will` handle is aborted then).
    pub(crate) fn schedule_will(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        will: MqttPublish,
        delay: Duration,
    ) {
        // A will the stored session holds is removed from it once
        // published (below); any other is published at once.
        let stored = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .and_then(|slot| slot.stored.as_ref())
            .is_some_and(|s| s.record.will.is_some());
        if delay.is_zero() && !stored {
            self.publish_will_now(will);
            return;
        }
        let me = self.clone();
        let id = client_id.clone();
        let delayed = will.clone();
        let task = tokio::spawn(async move {
            let will = delayed;
            tokio::time::sleep(delay).await;
            let record = {
                let mut s = me.sessions.lock().unwrap_or_else(|e| e.into_inner());
                s.get_mut(&id).and_then(|slot| {
                    slot.will = None;
                    let stored = slot.stored.as_mut()?;
                    stored.record.will.take()?;
                    Some(stored.record.clone())
                })
            };
            if let Err(e) = me.publish(&will).await {
                tracing::warn!(error = %e, "could not publish will");
            }
            // Published: the stored session no longer holds it (a crash
            // before this line publishes it again after the restart).
            if let Some(rec) = record {
                if let Err(e) = me.store_session(&id, &rec).await {
                    tracing::warn!(error = %e, "could not store session");
                }
            }
        });
        let pending = PendingWill {
            task: task.abort_handle(),
            will,
        };
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match s.get_mut(client_id) {
            Some(slot) if slot.online.is_none() => {
                if let Some(old) = slot.will.replace(pending) {
                    old.task.abort();
                }
            }
            // A new connection took the session over before the will was
            // scheduled. With a clean start the session ended: the will is
            // sent now; otherwise the session goes on and it is not sent
            // (MQTT 5 3.1.2.5).
            Some(slot) => {
                task.abort();
                if slot.online.as_ref().is_some_and(|o| o.clean_start) {
                    drop(s);
                    self.publish_will_now(pending.will);
                }
            }
            // No offline session to hang it on (clean session ended):
            // keep a slot just for the will.
            None => {
                s.insert(
                    client_id.clone(),
                    Slot {
                        will: Some(pending),
                        ..Slot::default()
                    },
                );
            }
        }
    }

    /// Publishes the will of a clean session that was online when the
    /// gateway crashed, then removes the record that held it (a crash
    /// in between publishes it again: at least once).
    fn publish_ended_session_will(
        self: &Arc<Self>,
        client_id: Arc<str>,
        will: Option<MqttPublish>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(will) = will {
                if let Err(e) = me.publish(&will).await {
                    tracing::warn!(error = %e, "could not publish will");
                    return;
                }
            }
            me.delete_session_record(&client_id).await;
        });
    }

    /// Deletes the stored record of a session that has ended, if it has
    /// one.
    pub(crate) async fn delete_session_record(&self, client_id: &str) {
        if self.sessions_ledger.cursor(client_id).is_some() {
            if let Err(e) = self.sessions_ledger.delete_cursor(client_id).await {
                tracing::warn!(error = %e, "could not delete a session record");
            }
        }
    }

    /// Publishes a will in the background.
    pub(crate) fn publish_will_now(self: &Arc<Self>, will: MqttPublish) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.publish(&will).await {
                tracing::warn!(error = %e, "could not publish will");
            }
        });
    }
}

/// The expiry deadline of a session disconnected at `at_ms`.
pub(crate) fn expiry_deadline(expiry: u32, at_ms: i64) -> Option<i64> {
    if expiry == u32::MAX {
        None
    } else {
        Some(at_ms + i64::from(expiry) * 1000)
    }
}

pub(crate) fn qos_label(q: u8) -> &'static str {
    match q {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}

/// The entry that stores an MQTT publish, stamped now.
fn publish_entry(p: &MqttPublish) -> AppendEntry {
    let now = now_ms();
    single_entry(&map::publish_to_message(p, now), now)
}

fn single_entry(msg: &Message, now: i64) -> AppendEntry {
    let payload: Bytes = encode_batch(std::slice::from_ref(msg));
    AppendEntry {
        format: EntryFormat::Messages,
        count: 1,
        first_timestamp: now,
        max_timestamp: now,
        payload,
    }
}

async fn append(ledger: &Ledger, msg: &Message, now: i64) -> Result<u64, BrokerError> {
    let a = ledger.append(single_entry(msg, now)).await?;
    Ok(a.base_offset)
}

async fn background(shared: std::sync::Weak<Shared>, shutdown: CancellationToken) {
    let interval = shared
        .upgrade()
        .map_or(1000, |s| s.config.topic_scan_interval_ms.max(50));
    let mut scan = tokio::time::interval(Duration::from_millis(interval));
    let mut expiry = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = scan.tick() => {
                let Some(s) = shared.upgrade() else { break };
                s.scan_topics().await;
            }
            _ = expiry.tick() => {
                let Some(s) = shared.upgrade() else { break };
                s.expire_sessions().await;
                let n = s.sessions.lock().unwrap_or_else(|e| e.into_inner()).len();
                metrics::gauge!("manifold_mqtt_sessions").set(n as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_will_round_trips_through_the_session_record() {
        let will = MqttPublish {
            topic: "a/b".into(),
            payload: Bytes::from_static(&[0, 1, 0xfe, 0xff, b'x']),
            qos: 2,
            retain: true,
            client_id: Some("c1".into()),
            payload_format: Some(0),
            message_expiry: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr")),
            user_properties: vec![("k".into(), "v".into())],
        };
        let rec = SessionRecord {
            expiry: 300,
            will: Some(Box::new(StoredWill::new(&will, 1234))),
            ..SessionRecord::default()
        };
        let json = serde_json::to_string(&rec).unwrap();
        let back: SessionRecord = serde_json::from_str(&json).unwrap();
        let w = back.will.unwrap();
        assert_eq!(w.at_ms, 1234);
        assert_eq!(w.publish("c1"), Some(will));
    }

    #[test]
    fn the_will_of_an_online_connection_keeps_its_delay_and_not_a_time() {
        let will = MqttPublish {
            topic: "t/gone".into(),
            payload: Bytes::from_static(b"bye"),
            qos: 1,
            ..MqttPublish::default()
        };
        let rec = SessionRecord {
            will: Some(Box::new(StoredWill::online(&will, 7))),
            ..SessionRecord::default()
        };
        let json = serde_json::to_string(&rec).unwrap();
        let back: SessionRecord = serde_json::from_str(&json).unwrap();
        let w = back.will.unwrap();
        assert_eq!(w.online_delay, Some(7));
        assert_eq!(w.at_ms, 0);
        assert_eq!(w.publish("c1").unwrap().payload, will.payload);
        // A will stored after its connection ended has a time instead.
        let later = serde_json::to_string(&StoredWill::new(&will, 99)).unwrap();
        assert!(!later.contains("online_delay"), "{later}");
    }

    #[test]
    fn records_without_a_will_read_as_before() {
        let old = r#"{"expiry":10,"subs":[],"disconnected_ms":5}"#;
        let rec: SessionRecord = serde_json::from_str(old).unwrap();
        assert!(rec.will.is_none());
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains("will"), "{json}");
    }

    #[test]
    fn a_damaged_stored_will_is_refused() {
        let mut w = StoredWill::new(&MqttPublish::default(), 0);
        w.payload = "zz".into();
        assert_eq!(w.publish("c"), None);
        w.payload = "abc".into();
        assert_eq!(w.publish("c"), None);
    }
}
