//! Redis URLs with a password and `rediss://` TLS work end to end; passwords never show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetq_broker::local_redis::LocalRedisOptions;
use fleetq_broker::{EnqueueOptions, JobState, LocalRedis, Producer, Redis, RedisConfig};
use fleetq_tests::{worker_config, FnHandler};
use fleetq_worker::Outcome;
use serde_json::json;

async fn round_trip(redis: Redis) {
    let p = Producer::new(&redis, "q").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let r = redis.clone();
    let w = tokio::spawn(async move {
        fleetq_worker::run(
            r,
            worker_config("q", "n1", 1),
            FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
            async move { s.cancelled().await },
        )
        .await
        .unwrap();
    });
    let e = p
        .enqueue(&json!({"secure": true}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.result.unwrap()["secure"], true);
    stop.cancel();
    w.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_the_url_works_and_is_masked() {
    let server = LocalRedis::start_with(LocalRedisOptions {
        password: Some("s3cret-pw".into()),
        ..Default::default()
    })
    .unwrap();
    let redis = Redis::connect(&server.url()).await.unwrap();
    assert!(!redis.url().contains("s3cret-pw"));
    assert!(!format!("{redis:?}").contains("s3cret-pw"));
    round_trip(redis).await;

    let wrong = server.url().replace("s3cret-pw", "wrong");
    let err = Redis::connect(&wrong).await.unwrap_err().to_string();
    assert!(!err.contains("wrong@"), "{err}");
    assert!(err.contains("***"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_works() {
    let dir = tempfile_dir();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = LocalRedis::start_with(LocalRedisOptions {
        tls: Some((cert_path.clone(), key_path)),
        ..Default::default()
    })
    .unwrap();
    assert!(server.url().starts_with("rediss://"));
    let mut cfg = RedisConfig::new(server.url());
    cfg.ca_cert = Some(cert_path);
    let redis = Redis::connect_with(cfg).await.unwrap();
    round_trip(redis).await;
    // Without the CA the server is not trusted, and the error says where it failed.
    let err = Redis::connect(&server.url()).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot connect to Redis at rediss://"),
        "{err}"
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fleetq-tls-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
