//! Each server-side function on its own, called the way any language would (FCALL).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use fleetq_broker::connection::SharedConn as ConnectionManager;
use fleetq_broker::functions;
use fleetq_broker::QueueKeys;
use fleetq_tests::Stack;

fn fcall(name: &str, keys: &QueueKeys) -> redis::Cmd {
    functions::fcall(name, keys)
}

async fn setup() -> (Stack, QueueKeys, ConnectionManager) {
    let s = Stack::start().await;
    let mut c = s.conn();
    functions::load(&mut c).await.unwrap();
    let keys = QueueKeys::new("q").unwrap();
    s.create_group("q").await;
    (s, keys, c)
}

async fn xadd(c: &mut ConnectionManager, keys: &QueueKeys, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys.stream()).arg("*");
    for (f, v) in fields {
        cmd.arg(*f).arg(*v);
    }
    cmd.query_async(c).await.unwrap()
}

async fn read(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    n: usize,
) -> Vec<String> {
    let r: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg(consumer)
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(c)
        .await
        .unwrap();
    r.keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|i| i.id)
        .collect()
}

/// fleetq_take for entries with default limits; returns (decision, deliveries, attempt) each.
async fn take(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    entries: &[(&str, &str)],
) -> Vec<(String, String, u64, u32)> {
    let mut cmd = fcall("fleetq_take", keys);
    cmd.arg(consumer).arg("node-x").arg(10_000).arg(1);
    for (entry, job) in entries {
        cmd.arg(*entry)
            .arg(*job)
            .arg(0)
            .arg(3)
            .arg(0)
            .arg(0)
            .arg("")
            .arg(0)
            .arg("")
            .arg(0);
    }
    cmd.query_async(c).await.unwrap()
}

async fn job_hash(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    id: &str,
) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(keys.job(id))
        .query_async(c)
        .await
        .unwrap()
}

#[tokio::test]
async fn loading_is_idempotent_and_versioned() {
    let (_s, _keys, mut c) = setup().await;
    functions::load(&mut c).await.unwrap();
    let v: String = redis::cmd("FCALL")
        .arg("fleetq_version")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, functions::library_version());
    // An older library is replaced.
    let old = functions::library_source().replace(&functions::library_version(), "0.9.0+old");
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(old)
        .query_async(&mut c)
        .await
        .unwrap();
    functions::load(&mut c).await.unwrap();
    let v: String = redis::cmd("FCALL")
        .arg("fleetq_version")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, functions::library_version());
    // A newer one is left alone.
    let newer = functions::library_source().replace(&functions::library_version(), "9.0.0+new");
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(newer)
        .query_async(&mut c)
        .await
        .unwrap();
    functions::load(&mut c).await.unwrap();
    let v: String = redis::cmd("FCALL")
        .arg("fleetq_version")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "9.0.0+new");
}

#[tokio::test]
async fn a_lost_library_is_reloaded_on_first_call() {
    let (_s, keys, mut c) = setup().await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut cmd = fcall("fleetq_status", &keys);
    cmd.arg("x");
    let flat: Vec<String> = functions::call(&mut c, &cmd, "status").await.unwrap();
    assert_eq!(flat, vec!["state", "not_found"]);
}

#[tokio::test]
async fn take_decides_run_lost_and_duplicate() {
    let (_s, keys, mut c) = setup().await;
    let e1 = xadd(&mut c, &keys, &[("payload", "{}"), ("id", "dup")]).await;
    let e2 = xadd(&mut c, &keys, &[("payload", "{}"), ("id", "dup")]).await;
    let e3 = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    assert_eq!(read(&mut c, &keys, "w1", 3).await.len(), 3);
    let r = take(&mut c, &keys, "w1", &[(&e1, "dup"), (&e2, "dup")]).await;
    assert_eq!(r[0].1, "run");
    assert_eq!((r[0].2, r[0].3), (1, 1));
    assert_eq!(
        r[1].1, "duplicate",
        "a second entry with a known id does not run"
    );
    let r = take(&mut c, &keys, "w2", &[(&e3, &e3)]).await;
    assert_eq!(r[0].1, "lost", "w2 does not own e3");
    let h = job_hash(&mut c, &keys, "dup").await;
    assert_eq!(h["state"], "running");
    assert_eq!(h["node"], "node-x");
    assert_eq!(h["entry"], e1);
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 2, "the duplicate entry was removed");
}

#[tokio::test]
async fn take_expires_jobs_past_their_queue_deadline() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    let mut cmd = fcall("fleetq_take", &keys);
    cmd.arg("w1")
        .arg("n")
        .arg(10_000)
        .arg(1)
        .arg(&e)
        .arg(&e)
        .arg(0)
        .arg(3)
        .arg(1)
        .arg(0);
    let r: Vec<(String, String, u64, u32)> = cmd.query_async(&mut c).await.unwrap();
    assert_eq!(r[0].1, "expired");
    let h = job_hash(&mut c, &keys, &e).await;
    assert_eq!(h["state"], "expired");
    assert_eq!(h["timeout"], "queue");
}

#[tokio::test]
async fn renew_checks_ownership_and_reports_cancel() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let renew = |consumer: &str, deliveries: u64| {
        let mut cmd = fcall("fleetq_renew", &keys);
        cmd.arg(consumer)
            .arg(10_000)
            .arg("node-x")
            .arg(&e)
            .arg(deliveries)
            .arg(&e);
        cmd
    };
    let r: Vec<String> = renew("w1", 1).query_async(&mut c).await.unwrap();
    assert_eq!(r, vec!["ok"]);
    let r: Vec<String> = renew("w2", 1).query_async(&mut c).await.unwrap();
    assert_eq!(
        r,
        vec!["lost"],
        "another consumer cannot renew (nor steal) it"
    );
    let r: Vec<String> = renew("w1", 2).query_async(&mut c).await.unwrap();
    assert_eq!(r, vec!["lost"], "a stale delivery count is refused");
    let owner: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner[0].1, "w1");
    let mut cancel = fcall("fleetq_cancel", &keys);
    cancel.arg(&e);
    let (state,): (String,) = cancel.query_async(&mut c).await.unwrap();
    assert_eq!(state, "cancelling");
    let r: Vec<String> = renew("w1", 1).query_async(&mut c).await.unwrap();
    assert_eq!(r, vec!["cancel"]);
}

#[tokio::test]
async fn complete_is_fenced_and_all_or_nothing() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let complete = |consumer: &str| {
        let mut cmd = fcall("fleetq_complete", &keys);
        cmd.arg(consumer)
            .arg(&e)
            .arg(1)
            .arg(&e)
            .arg("succeeded")
            .arg(r#"{"v":1}"#)
            .arg(0)
            .arg("")
            .arg("");
        cmd
    };
    let r: String = complete("w2").query_async(&mut c).await.unwrap();
    assert_eq!(r, "fenced");
    assert_eq!(
        job_hash(&mut c, &keys, &e).await["state"],
        "running",
        "nothing written"
    );
    let fenced: String = redis::cmd("HGET")
        .arg(keys.stats())
        .arg("fenced")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fenced, "1");
    let r: String = complete("w1").query_async(&mut c).await.unwrap();
    assert_eq!(r, "ok");
    let h = job_hash(&mut c, &keys, &e).await;
    assert_eq!(h["state"], "succeeded");
    assert_eq!(h["result"], r#"{"v":1}"#);
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 0);
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(pending.is_empty());
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.job(&e))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0, "the finished job expires after its retention");
    // A second commit of the same delivery is fenced too.
    let r: String = complete("w1").query_async(&mut c).await.unwrap();
    assert_eq!(r, "fenced");
}

#[tokio::test]
async fn promote_moves_each_due_job_once() {
    let (s, keys, mut c) = setup().await;
    let mut enq = fcall("fleetq_enqueue", &keys);
    enq.arg("{}").arg("delay_ms").arg(1).arg("id").arg("later");
    let (_, state, _, _): (String, String, u64, u8) = enq.query_async(&mut c).await.unwrap();
    assert_eq!(state, "scheduled");
    fleetq_tests::eventually(std::time::Duration::from_secs(2), "the job due", || async {
        let now = fleetq_broker::nodes::server_ms(&s.redis).await.unwrap();
        let due: u64 = redis::cmd("ZCOUNT")
            .arg(keys.delayed())
            .arg("-inf")
            .arg(now)
            .query_async(&mut s.conn())
            .await
            .unwrap();
        due == 1
    })
    .await;
    // Two promoters at once (a pipeline stands for two brokers): one moves it.
    let mut pipe = redis::pipe();
    pipe.add_command(fcall("fleetq_promote", &keys).arg(10).clone());
    pipe.add_command(fcall("fleetq_promote", &keys).arg(10).clone());
    let r: Vec<(u64, u64)> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(r[0].0 + r[1].0, 1);
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 1);
    assert_eq!(job_hash(&mut c, &keys, "later").await["state"], "waiting");
}

#[tokio::test]
async fn reclaim_takes_idle_entries_and_skips_deleted_ones() {
    let (_s, keys, mut c) = setup().await;
    let e1 = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let e2 = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "dead-host", 2).await;
    // Age both entries past a 1 s lease without waiting; delete e2 behind the group's back.
    for e in [&e1, &e2] {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(keys.stream())
            .arg("workers")
            .arg("dead-host")
            .arg(0)
            .arg(e)
            .arg("IDLE")
            .arg(5000)
            .arg("JUSTID")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: u64 = redis::cmd("XDEL")
        .arg(keys.stream())
        .arg(&e2)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut cmd = fcall("fleetq_reclaim", &keys);
    cmd.arg("w2").arg(1000).arg(4).arg("node-y");
    type Entry = (String, Vec<(String, String)>);
    let (entries, _next, _now): (Vec<Entry>, u64, u64) = cmd.query_async(&mut c).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, e1);
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "the deleted entry left the pending list");
    assert_eq!(
        (pending[0].1.as_str(), pending[0].3),
        ("w2", 2),
        "the claim counts a delivery"
    );
}

#[tokio::test]
async fn status_and_cancel_of_unknown_jobs() {
    let (_s, keys, mut c) = setup().await;
    let mut st = fcall("fleetq_status", &keys);
    st.arg("nope");
    let flat: Vec<String> = st.query_async(&mut c).await.unwrap();
    assert_eq!(flat, vec!["state", "not_found"]);
    let mut cancel = fcall("fleetq_cancel", &keys);
    cancel.arg("1-1");
    let (state,): (String,) = cancel.query_async(&mut c).await.unwrap();
    assert_eq!(state, "not_found");
}

#[tokio::test]
async fn enqueue_refuses_bad_input_with_a_reason() {
    let (_s, keys, mut c) = setup().await;
    for (args, want) in [
        (vec!["{x"], "not valid JSON"),
        (vec!["{}", "colour", "red"], "unknown field"),
        (vec!["{}", "max_attempts", "0"], "positive integer"),
        (vec!["{}", "id"], "pairs"),
    ] {
        let mut cmd = fcall("fleetq_enqueue", &keys);
        for a in &args {
            cmd.arg(*a);
        }
        let err = cmd
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn expire_dead_letters_entries_whose_last_lease_ran_out() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}"), ("max_attempts", "2")]).await;
    let keep = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "dead-host", 2).await;
    // Both idle past the lease; `e` has used both its attempts, `keep` one of three.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(keys.stream())
        .arg("workers")
        .arg("dead-host")
        .arg(0)
        .arg(&e)
        .arg("IDLE")
        .arg(60_000)
        .arg("RETRYCOUNT")
        .arg(2)
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(keys.stream())
        .arg("workers")
        .arg("dead-host")
        .arg(0)
        .arg(&keep)
        .arg("IDLE")
        .arg(60_000)
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut cmd = fcall("fleetq_expire", &keys);
    cmd.arg(100);
    let (ended, _): (u64, u64) = cmd.query_async(&mut c).await.unwrap();
    assert_eq!(ended, 1);
    let h = job_hash(&mut c, &keys, &e).await;
    assert_eq!(
        (h["state"].as_str(), h["reason"].as_str()),
        ("dead", "attempts_exhausted")
    );
    let dead: u64 = redis::cmd("XLEN")
        .arg(keys.dead())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the job with attempts left waits for a reclaim"
    );
    assert_eq!(pending[0].0, keep);
}
