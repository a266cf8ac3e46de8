//! The handler on a real socket (test kit broker, loopback port 0), driven
//! by requests encoded with `kafka-protocol`: produce -> stored entry ->
//! fetch, the cross-protocol path (an entry written as core messages is
//! fetched as a valid Kafka batch), long polling, and commits as cursors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{AppendEntry, EntryFormat, Message, NamespaceName, TopicConfig, TopicName};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use handler_api::testkit::{run_handler, TestBroker};
use handler_kafka::{KafkaConfig, KafkaHandler};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, OffsetCommitRequest, OffsetCommitResponse, ProduceRequest,
    ProduceResponse, RequestHeader, RequestKind, ResponseKind,
};
use kafka_protocol::protocol::{encode_request_header_into_buffer, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Client {
    s: TcpStream,
    corr: i32,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            corr: 0,
        }
    }

    async fn call(&mut self, api: ApiKey, version: i16, body: RequestKind) -> ResponseKind {
        self.corr += 1;
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        let h = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.corr)
            .with_client_id(Some(StrBytes::from_static_str("it")));
        encode_request_header_into_buffer(&mut buf, &h).unwrap();
        body.encode(&mut buf, version).unwrap();
        let n = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        self.s.write_all(&buf).await.unwrap();
        let len = self.s.read_i32().await.unwrap() as usize;
        let mut resp = vec![0u8; len];
        self.s.read_exact(&mut resp).await.unwrap();
        let mut resp = Bytes::from(resp);
        assert_eq!(resp.get_i32(), self.corr);
        if api.response_header_version(version) >= 1 {
            // tagged fields of the flexible header (none are sent)
            assert_eq!(resp.get_u8(), 0);
        }
        ResponseKind::decode(api, &mut resp, version).unwrap()
    }
}

fn config() -> KafkaConfig {
    KafkaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..KafkaConfig::default()
    }
}

fn msg(key: &str, value: &str) -> Message {
    Message {
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        headers: vec![("origin".into(), Bytes::from_static(b"mqtt"))],
        event_time: Some(1_700_000_000_000),
        ..Message::new(value.as_bytes().to_vec())
    }
}

fn fetch_req(topic: &str, offset: i64, wait_ms: i32) -> RequestKind {
    RequestKind::Fetch(
        FetchRequest::default()
            .with_max_wait_ms(wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(StrBytes::from_string(topic.into()).into())
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(1 << 20)])]),
    )
}

fn records_of(r: ResponseKind) -> (i16, Bytes) {
    let ResponseKind::Fetch(FetchResponse { responses, .. }) = r else {
        panic!("not a fetch response")
    };
    let p = &responses[0].partitions[0];
    (p.error_code, p.records.clone().unwrap_or_default())
}

#[tokio::test]
async fn produce_fetch_and_cross_protocol_entries() {
    let tb = TestBroker::start().await;
    let broker = tb.broker.clone();
    let h = Arc::new(KafkaHandler::new(config()).unwrap());
    let running = run_handler(h, broker.clone()).await.unwrap();
    let addr = running.addr("kafka");
    let name = TopicName::new(NamespaceName::default_namespace(), "mixed").unwrap();
    broker
        .create_topic(&name, 1, TopicConfig::default())
        .await
        .unwrap();
    let ledger = broker.ledger(&name, 0).unwrap();

    // Another protocol writes two messages as core messages.
    let msgs = vec![msg("a", "from mqtt"), msg("b", "second")];
    ledger
        .append(AppendEntry {
            format: EntryFormat::Messages,
            count: 2,
            first_timestamp: 1,
            max_timestamp: 1,
            payload: broker::message::encode_batch(&msgs),
        })
        .await
        .unwrap();

    // A Kafka producer adds a batch.
    let kbatch = mapping::kafka::messages_to_batch(0, &[msg("c", "from kafka")]);
    let mut c = Client::connect(addr).await;
    let r = c
        .call(
            ApiKey::Produce,
            9,
            RequestKind::Produce(
                ProduceRequest::default()
                    .with_acks(-1)
                    .with_timeout_ms(5000)
                    .with_topic_data(vec![TopicProduceData::default()
                        .with_name(StrBytes::from_static_str("mixed").into())
                        .with_partition_data(vec![PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(kbatch.clone()))])]),
            ),
        )
        .await;
    let ResponseKind::Produce(ProduceResponse { responses, .. }) = r else {
        panic!()
    };
    let pr = &responses[0].partition_responses[0];
    assert_eq!((pr.error_code, pr.base_offset), (0, 2));
    // Stored verbatim, readable as core messages by any other protocol.
    let stored = ledger.read(2, 1 << 20).await.unwrap();
    assert_eq!(stored[0].format, EntryFormat::KafkaRecordBatch);
    assert_eq!(stored[0].payload, kbatch);
    let as_core = mapping::entry_messages(&stored[0]).unwrap();
    assert_eq!(as_core[0].payload, Bytes::from_static(b"from kafka"));

    // Fetch from 0: both entries as valid Kafka batches with real offsets.
    let (err, records) = records_of(c.call(ApiKey::Fetch, 12, fetch_req("mixed", 0, 0)).await);
    assert_eq!(err, 0);
    let batches = mapping::kafka::split_and_validate(&records).unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].header.base_offset, 0);
    assert_eq!(batches[1].header.base_offset, 2);
    let got = mapping::kafka::batch_to_messages(&records).unwrap();
    let values: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(values, vec![&b"from mqtt"[..], b"second", b"from kafka"]);
    assert_eq!(got[0].header("origin").map(|b| &b[..]), Some(&b"mqtt"[..]));
    assert_eq!(got[1].key.as_deref(), Some(&b"b"[..]));

    // Out of range.
    let (err, _) = records_of(c.call(ApiKey::Fetch, 12, fetch_req("mixed", 99, 0)).await);
    assert_eq!(err, 1);

    // Long polling: a fetch at the end is answered as soon as data arrives.
    let l2 = ledger.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = Message::new(&b"late"[..]);
        l2.append(AppendEntry {
            format: EntryFormat::Messages,
            count: 1,
            first_timestamp: m.publish_time,
            max_timestamp: m.publish_time,
            payload: broker::message::encode_batch(&[m]),
        })
        .await
        .unwrap();
    });
    let t0 = Instant::now();
    let (err, records) = records_of(
        c.call(ApiKey::Fetch, 12, fetch_req("mixed", 3, 10_000))
            .await,
    );
    assert_eq!(err, 0);
    assert!(t0.elapsed() < Duration::from_secs(5), "woken by the append");
    let got = mapping::kafka::batch_to_messages(&records).unwrap();
    assert_eq!(&got[0].payload[..], b"late");

    // An offset commit is the durable cursor `kafka.<group>`.
    let r = c
        .call(
            ApiKey::OffsetCommit,
            8,
            RequestKind::OffsetCommit(
                OffsetCommitRequest::default()
                    .with_group_id(StrBytes::from_static_str("g1").into())
                    .with_generation_id_or_member_epoch(-1)
                    .with_topics(vec![OffsetCommitRequestTopic::default()
                        .with_name(StrBytes::from_static_str("mixed").into())
                        .with_partitions(vec![OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(3)])]),
            ),
        )
        .await;
    let ResponseKind::OffsetCommit(OffsetCommitResponse { topics, .. }) = r else {
        panic!()
    };
    assert_eq!(topics[0].partitions[0].error_code, 0);
    assert_eq!(ledger.cursor("kafka.g1").unwrap().mark_delete(), 3);
}
