//! The broker: namespaces, topics, persisted metadata, auto-creation,
//! deletion, back-pressure and background retention.

mod common;

use std::sync::Arc;
use std::time::Duration;

use broker::{
    Broker, BrokerConfig, BrokerError, InitialPosition, NamespaceName, NamespacePolicy,
    TopicConfig, TopicName,
};
use common::entry;

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_owned(),
        ..BrokerConfig::default()
    }
}

fn topic(ns: &NamespaceName, t: &str) -> TopicName {
    TopicName::new(ns.clone(), t).unwrap()
}

#[tokio::test]
async fn metadata_and_data_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(config(dir.path())).await.unwrap();
    assert_eq!(b.tenants(), vec!["public".to_string()]);
    b.create_tenant("acme").await.unwrap();
    let ns = NamespaceName::new("acme", "prod").unwrap();
    let pol = NamespacePolicy {
        retention_ms: 5_000,
        default_partitions: 4,
        ..NamespacePolicy::default()
    };
    b.create_namespace(&ns, Some(pol.clone())).await.unwrap();
    let t = topic(&ns, "orders");
    b.create_topic(
        &t,
        3,
        TopicConfig {
            retention_bytes: Some(1 << 20),
            ..TopicConfig::default()
        },
    )
    .await
    .unwrap();
    for p in 0..3 {
        let l = b.ledger(&t, p).unwrap();
        l.append(entry(format!("p{p}"), 1, 0)).await.unwrap();
        l.open_cursor("sub", InitialPosition::Earliest)
            .await
            .unwrap()
            .ack(0);
    }
    b.shutdown().await;
    drop(b);

    let b = Broker::open(config(dir.path())).await.unwrap();
    assert_eq!(b.namespace_policy(&ns).unwrap(), pol);
    let meta = b.topic(&t).unwrap();
    assert_eq!(meta.partitions, 3);
    assert_eq!(meta.config.retention_bytes, Some(1 << 20));
    let stats = b.topic_stats(&t).unwrap();
    for (p, s) in stats.partitions.iter().enumerate() {
        assert_eq!(s.end_offset, 1);
        assert_eq!(s.cursors[0].mark_delete, 1);
        assert_eq!(s.cursors[0].backlog_messages, 0);
        let e = b.ledger(&t, p as u32).unwrap().read(0, 10).await.unwrap();
        assert_eq!(e[0].payload.as_ref(), format!("p{p}").as_bytes());
    }
    b.shutdown().await;
}

#[tokio::test]
async fn auto_creation_follows_the_namespace_policy() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(config(dir.path())).await.unwrap();
    let d = NamespaceName::default_namespace();
    let t = b.ensure_topic(&topic(&d, "auto")).await.unwrap();
    assert_eq!(t.partitions, 1);
    b.create_tenant("strict").await.unwrap();
    let ns = NamespaceName::new("strict", "ns").unwrap();
    b.create_namespace(
        &ns,
        Some(NamespacePolicy {
            auto_create_topics: false,
            ..NamespacePolicy::default()
        }),
    )
    .await
    .unwrap();
    assert!(matches!(
        b.ensure_topic(&topic(&ns, "x")).await,
        Err(BrokerError::TopicNotFound(_))
    ));
    let missing = NamespaceName::new("nobody", "ns").unwrap();
    assert!(matches!(
        b.ensure_topic(&topic(&missing, "x")).await,
        Err(BrokerError::NamespaceNotFound(_))
    ));
    // Concurrent first use creates the topic once.
    let mut hs = Vec::new();
    for _ in 0..8 {
        let b = b.clone();
        let t = topic(&d, "race");
        hs.push(tokio::spawn(async move {
            b.ensure_topic(&t).await.map(|m| m.id)
        }));
    }
    let mut ids = Vec::new();
    for h in hs {
        ids.push(h.await.unwrap().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    b.shutdown().await;
}

#[tokio::test]
async fn deleting_a_topic_removes_its_data_and_recreation_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(config(dir.path())).await.unwrap();
    let t = topic(&NamespaceName::default_namespace(), "gone");
    b.create_topic(&t, 2, TopicConfig::default()).await.unwrap();
    b.ledger(&t, 1)
        .unwrap()
        .append(entry("x", 1, 0))
        .await
        .unwrap();
    assert!(matches!(
        b.create_topic(&t, 2, TopicConfig::default()).await,
        Err(BrokerError::AlreadyExists(_))
    ));
    assert!(matches!(
        b.delete_namespace(&NamespaceName::default_namespace())
            .await,
        Err(BrokerError::NotEmpty(_))
    ));
    b.delete_topic(&t).await.unwrap();
    assert!(matches!(
        b.ledger(&t, 0),
        Err(BrokerError::TopicNotFound(_))
    ));
    b.create_topic(&t, 2, TopicConfig::default()).await.unwrap();
    assert_eq!(b.ledger(&t, 1).unwrap().end_offset(), 0);
    let grown = b.set_partitions(&t, 5).await.unwrap();
    assert_eq!(grown.partitions, 5);
    assert!(b.ledger(&t, 4).is_ok());
    assert!(b.set_partitions(&t, 3).await.is_err());
    b.shutdown().await;
}

#[tokio::test]
async fn producers_wait_on_the_memory_budget_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(BrokerConfig {
        memory_budget_bytes: 8 * 1024,
        append_queue_depth: 2,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let t = topic(&NamespaceName::default_namespace(), "bp");
    b.create_topic(&t, 1, TopicConfig::default()).await.unwrap();
    let l = b.ledger(&t, 0).unwrap();
    let mut hs = Vec::new();
    for i in 0..200u32 {
        let l = l.clone();
        hs.push(tokio::spawn(async move {
            l.append(entry(vec![i as u8; 3000], 1, 0)).await
        }));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(l.end_offset(), 200);
    // An entry larger than the whole budget still goes through (alone).
    l.append(entry(vec![0u8; 64 * 1024], 1, 0)).await.unwrap();
    b.shutdown().await;
}

#[tokio::test]
async fn background_retention_deletes_expired_segments() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::open(BrokerConfig {
        retention_check_interval_ms: 50,
        default_policy: NamespacePolicy {
            segment_bytes: 4096,
            retention_ms: 1,
            ..NamespacePolicy::default()
        },
        ..config(dir.path())
    })
    .await
    .unwrap();
    let t = topic(&NamespaceName::default_namespace(), "expiring");
    b.create_topic(&t, 1, TopicConfig::default()).await.unwrap();
    let l = b.ledger(&t, 0).unwrap();
    for _ in 0..50 {
        l.append(entry(vec![0u8; 500], 1, 1_000)).await.unwrap();
    }
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if l.stats().segments == 1 {
            ok = true;
            break;
        }
    }
    assert!(ok, "expired sealed segments are deleted: {:?}", l.stats());
    assert!(l.start_offset() > 0);
    assert_eq!(l.end_offset(), 50);
    b.shutdown().await;
}

#[tokio::test]
async fn namespace_policy_changes_reach_open_ledgers() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<Broker> = Broker::open(config(dir.path())).await.unwrap();
    let d = NamespaceName::default_namespace();
    let t = topic(&d, "p");
    b.create_topic(&t, 1, TopicConfig::default()).await.unwrap();
    let p = NamespacePolicy {
        segment_bytes: 4096,
        ..NamespacePolicy::default()
    };
    b.set_namespace_policy(&d, p).await.unwrap();
    let l = b.ledger(&t, 0).unwrap();
    for _ in 0..20 {
        l.append(entry(vec![0u8; 1000], 1, 0)).await.unwrap();
    }
    assert!(l.stats().segments > 1, "the new segment size applies");
    assert!(b
        .set_namespace_policy(
            &d,
            NamespacePolicy {
                default_partitions: 0,
                ..NamespacePolicy::default()
            }
        )
        .await
        .is_err());
    b.shutdown().await;
}
