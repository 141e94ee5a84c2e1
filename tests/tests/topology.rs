//! The cluster and sentinel harnesses themselves, checked with plain per-node `redis`
//! connections: the topology they report is the one the servers act on, and their failovers,
//! kills and restarts leave the servers in the roles they claim.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleetq_broker::QueueKeys;
use fleetq_tests::cluster::{ClusterOptions, RedisCluster, Role, SLOTS};
use fleetq_tests::sentinel::{SentinelSetup, SERVICE_NAME};
use fleetq_tests::{direct_connection, eventually};
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind};

async fn conn(url: &str) -> MultiplexedConnection {
    direct_connection(url).await
}

async fn xadd(
    conn: &mut MultiplexedConnection,
    key: &str,
    value: &str,
) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("payload")
        .arg(value)
        .query_async(conn)
        .await
}

async fn payloads(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .flat_map(|(_, fields)| fields.into_iter().map(|(_, v)| v))
        .collect()
}

async fn info_field(conn: &mut MultiplexedConnection, field: &str) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_starts_with_a_replica_per_primary_and_queue_names_on_each_primary() {
    let started = Instant::now();
    let cluster = RedisCluster::start().await;
    eprintln!("cluster up in {:?}", started.elapsed());

    let nodes = cluster.nodes().await;
    assert_eq!(nodes.len(), 6, "{nodes:#?}");
    let primaries = cluster.primary_ports().await;
    assert_eq!(primaries.len(), 3);
    let followed: BTreeSet<u16> = nodes
        .iter()
        .filter(|n| n.role == Role::Replica)
        .map(|n| n.primary_port.unwrap())
        .collect();
    assert_eq!(
        followed,
        primaries.iter().copied().collect(),
        "each primary has its own replica: {nodes:#?}"
    );
    let slots: usize = nodes
        .iter()
        .flat_map(|n| &n.slots)
        .map(|r| usize::from(r.end() - r.start()) + 1)
        .sum();
    assert_eq!(slots, usize::from(SLOTS));
    let seeds: Vec<String> = primaries.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(
        cluster.seed_url(),
        format!("redis+cluster://{}", seeds.join(","))
    );

    let names = cluster.queue_names_on_each_primary().await;
    for (i, name) in names.iter().enumerate() {
        let stream = QueueKeys::new(name).unwrap().stream();
        let slot = cluster.slot_of(&stream).await;
        assert_eq!(cluster.primary_for_slot(slot).await, primaries[i], "{name}");
        // The servers agree: its own primary takes the write, another one redirects it.
        let mut own = conn(&cluster.node_url(primaries[i])).await;
        xadd(&mut own, &stream, "x").await.unwrap();
        let mut other = conn(&cluster.node_url(primaries[(i + 1) % 3])).await;
        let err = xadd(&mut other, &stream, "x").await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Server(ServerErrorKind::Moved),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_start_with_takes_the_shape_it_is_given() {
    let cluster = RedisCluster::start_with(ClusterOptions {
        replicas_per_primary: 0,
        extra: vec![("maxmemory".into(), "64mb".into())],
        ..ClusterOptions::default()
    })
    .await;
    let nodes = cluster.nodes().await;
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n.role == Role::Primary), "{nodes:#?}");
    let mut c = conn(&cluster.node_url(nodes[0].port)).await;
    let maxmemory: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(maxmemory, ["maxmemory", "67108864"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_keeps_what_was_written_before_and_moves_the_slots() {
    let cluster = RedisCluster::start().await;
    let [q0, _, _] = cluster.queue_names_on_each_primary().await;
    let stream = QueueKeys::new(&q0).unwrap().stream();
    let old = cluster.primary_ports().await[0];
    let replica = cluster.replicas_of(old).await[0];
    xadd(&mut conn(&cluster.node_url(old)).await, &stream, "before")
        .await
        .unwrap();

    let started = Instant::now();
    let new = cluster.failover(old).await;
    eprintln!("manual failover in {:?}", started.elapsed());

    assert_eq!(new, replica);
    let slot = cluster.slot_of(&stream).await;
    assert_eq!(cluster.primary_for_slot(slot).await, new);
    let mut new_conn = conn(&cluster.node_url(new)).await;
    assert_eq!(payloads(&mut new_conn, &stream).await, ["before"]);
    xadd(&mut new_conn, &stream, "after").await.unwrap();
    let old_node = cluster
        .nodes()
        .await
        .into_iter()
        .find(|n| n.port == old)
        .unwrap();
    assert_eq!(old_node.role, Role::Replica);
    assert_eq!(old_node.primary_port, Some(new));
    let err = xadd(&mut conn(&cluster.node_url(old)).await, &stream, "x")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::Moved),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill_primary_promotes_its_replica_and_the_restarted_node_follows_it() {
    let mut cluster = RedisCluster::start().await;
    let [_, q1, _] = cluster.queue_names_on_each_primary().await;
    let stream = QueueKeys::new(&q1).unwrap().stream();
    let old = cluster.primary_ports().await[1];
    let replica = cluster.replicas_of(old).await[0];
    let mut old_conn = conn(&cluster.node_url(old)).await;
    xadd(&mut old_conn, &stream, "replicated").await.unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut old_conn)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the write");
    let pid = cluster.pid(old).unwrap();

    let started = Instant::now();
    let new = cluster.kill_primary(old).await;
    eprintln!("failover after kill -9 in {:?}", started.elapsed());

    assert_eq!(new, replica);
    assert!(fleetq_tests::process_gone(pid), "the old primary is dead");
    assert_eq!(cluster.pid(old), None);
    let mut new_conn = conn(&cluster.node_url(new)).await;
    assert_eq!(payloads(&mut new_conn, &stream).await, ["replicated"]);
    xadd(&mut new_conn, &stream, "after").await.unwrap();

    let started = Instant::now();
    let back = cluster.restart(old).await;
    eprintln!("restarted node rejoined in {:?}", started.elapsed());
    assert_eq!(back.role, Role::Replica);
    assert_eq!(back.primary_port, Some(new));
    let mut back_conn = conn(&cluster.node_url(old)).await;
    assert_eq!(
        info_field(&mut back_conn, "master_port").await.as_deref(),
        Some(new.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_frozen_primary_is_replaced_and_rejoins_as_a_replica_when_thawed() {
    let mut cluster = RedisCluster::start().await;
    let old = cluster.primary_ports().await[2];
    let replica = cluster.replicas_of(old).await[0];

    let started = Instant::now();
    let new = cluster.freeze_primary(old).await;
    eprintln!("failover after SIGSTOP in {:?}", started.elapsed());
    assert_eq!(new, replica);

    cluster.thaw(old);
    let view = cluster.wait_converged().await;
    let thawed = view.iter().find(|n| n.port == old).unwrap();
    assert_eq!(thawed.role, Role::Replica);
    assert_eq!(thawed.primary_port, Some(new));
    assert_eq!(cluster.primary_ports().await[2], new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_switches_the_reported_primary_which_takes_writes() {
    let started = Instant::now();
    let setup = SentinelSetup::start().await;
    eprintln!("sentinel setup up in {:?}", started.elapsed());
    let sentinels: Vec<String> = setup
        .sentinel_ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert_eq!(
        setup.url(),
        format!("redis+sentinel://{}/{SERVICE_NAME}", sentinels.join(","))
    );
    let [first, second] = setup.data_ports();
    assert_eq!(setup.primary_port().await, first);
    assert_eq!(setup.replica_port().await, second);

    let started = Instant::now();
    let new = setup.failover().await;
    eprintln!("sentinel failover in {:?}", started.elapsed());

    assert_eq!(new, second);
    assert_eq!(setup.primary_port().await, second);
    let mut new_conn = conn(&setup.server_url(new)).await;
    let _: () = redis::cmd("SET")
        .arg("probe")
        .arg("written after the failover")
        .query_async(&mut new_conn)
        .await
        .unwrap();
    let mut old_conn = conn(&setup.server_url(first)).await;
    let err = redis::cmd("SET")
        .arg("probe")
        .arg("x")
        .query_async::<()>(&mut old_conn)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly),
        "{err}"
    );
    eventually(
        Duration::from_secs(10),
        "the old primary replicates the write",
        || {
            let mut c = old_conn.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("probe")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                v.as_deref() == Some("written after the failover")
            }
        },
    )
    .await;

    // And back: a second failover right after the first one works too.
    let started = Instant::now();
    assert_eq!(setup.failover().await, first);
    eprintln!("second sentinel failover in {:?}", started.elapsed());
    assert_eq!(setup.primary_port().await, first);
    assert_eq!(
        info_field(&mut new_conn, "role").await.as_deref(),
        Some("slave")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_unassisted_failover_ends_with_sentinel_demoting_the_old_primary() {
    let setup = SentinelSetup::start().await;
    let [first, second] = setup.data_ports();

    let started = Instant::now();
    assert_eq!(setup.failover_unassisted().await, second);
    eprintln!("unassisted sentinel failover in {:?}", started.elapsed());

    let mut old_conn = conn(&setup.server_url(first)).await;
    assert_eq!(
        info_field(&mut old_conn, "role").await.as_deref(),
        Some("slave")
    );
    assert_eq!(
        info_field(&mut old_conn, "master_port").await.as_deref(),
        Some(second.to_string().as_str())
    );
    let err = redis::cmd("SET")
        .arg("probe")
        .arg("x")
        .query_async::<()>(&mut old_conn)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_kill_primary_promotes_the_replica_and_the_old_primary_rejoins() {
    let mut setup = SentinelSetup::start().await;
    let [first, second] = setup.data_ports();
    let mut first_conn = conn(&setup.server_url(first)).await;
    let _: () = redis::cmd("SET")
        .arg("probe")
        .arg("before")
        .query_async(&mut first_conn)
        .await
        .unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut first_conn)
        .await
        .unwrap();
    assert_eq!(acked, 1);

    let started = Instant::now();
    let new = setup.kill_primary().await;
    eprintln!("sentinel failover after kill -9 in {:?}", started.elapsed());

    assert_eq!(new, second);
    assert_eq!(setup.primary_port().await, second);
    let mut new_conn = conn(&setup.server_url(new)).await;
    let v: Option<String> = redis::cmd("GET")
        .arg("probe")
        .query_async(&mut new_conn)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("before"));
    let _: () = redis::cmd("SET")
        .arg("probe")
        .arg("after")
        .query_async(&mut new_conn)
        .await
        .unwrap();

    let started = Instant::now();
    assert_eq!(setup.restart_old_primary().await, first);
    eprintln!("old primary rejoined in {:?}", started.elapsed());
    let mut back = conn(&setup.server_url(first)).await;
    assert_eq!(
        info_field(&mut back, "role").await.as_deref(),
        Some("slave")
    );
    assert_eq!(
        info_field(&mut back, "master_port").await.as_deref(),
        Some(second.to_string().as_str())
    );
}
