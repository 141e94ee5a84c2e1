//! A Redis at `maxmemory`: an enqueue is refused with an error that names maxmemory and what
//! to do, and the eviction policy fleetq needs (`noeviction`) is checked at start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleetq_broker::{EnqueueOptions, Error};
use fleetq_tests::Stack;
use serde_json::json;

async fn config_set(s: &Stack, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(&mut s.conn())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_enqueue_refused_for_memory_says_maxmemory_and_what_to_do() {
    let s = Stack::start().await;
    config_set(&s, "maxmemory-policy", "noeviction").await;
    let producer = s.producer("q").await;
    producer
        .enqueue(&json!({"n": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    // Any used memory is above 1 byte: every write is refused with -OOM from here on.
    config_set(&s, "maxmemory", "1").await;
    let err = producer
        .enqueue(&json!({"n": 2}), &EnqueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("maxmemory"), "{text}");
    assert!(text.contains("nothing was queued"), "{text}");
    assert!(text.contains("docs/operations.md"), "{text}");
    assert!(
        err.is_transient(),
        "memory can be freed: worth trying again"
    );
    let batch = producer
        .enqueue_batch(&["{}".to_owned()])
        .await
        .unwrap_err();
    assert!(batch.to_string().contains("maxmemory"), "{batch}");
    assert_eq!(s.redis.check_eviction_policy().await.unwrap(), "noeviction");

    config_set(&s, "maxmemory", "0").await;
    let ok = producer
        .enqueue(&json!({"n": 3}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(ok.created);
}

#[tokio::test]
async fn an_evicting_policy_is_reported_without_failing() {
    let s = Stack::start().await;
    for policy in ["allkeys-lru", "volatile-ttl", "noeviction"] {
        config_set(&s, "maxmemory-policy", policy).await;
        assert_eq!(s.redis.check_eviction_policy().await.unwrap(), policy);
    }
}
