//! Each server-side function on its own, called the way any language would (FCALL).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use std::time::Duration;

use fleetq_broker::calls::{
    self, Caller, Commit, Committed, Completion, Ending, HoldReply, Holding, ProgressKind,
    ReclaimReply, TakeDecision, TakeEntry, TakeReply, Token,
};
use fleetq_broker::connection::SharedConn as ConnectionManager;
use fleetq_broker::functions;
use fleetq_broker::QueueKeys;
use fleetq_tests::{Server, Stack};

/// The server these tests run on. As its own test target this file runs on Redis; the
/// `core_on_valkey` target includes it as a module and its `crate::SERVER` is Valkey (then
/// this one is unused).
#[allow(dead_code)]
const SERVER: Server = Server::Redis;

fn fcall(name: &str, keys: &QueueKeys) -> redis::Cmd {
    functions::fcall(name, keys)
}

async fn setup() -> (Stack, QueueKeys, ConnectionManager) {
    let s = Stack::start_on(crate::SERVER).await;
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

/// An entry for fleetq_take with default limits and a fresh token.
fn entry(entry_id: &str, job_id: &str) -> TakeEntry {
    TakeEntry {
        entry_id: entry_id.into(),
        job_id: job_id.into(),
        token: Some(Token::new()),
        max_attempts: 3,
        ..TakeEntry::default()
    }
}

fn caller(consumer: &str) -> Caller {
    Caller {
        consumer: consumer.into(),
        node: format!("node-{consumer}"),
    }
}

/// fleetq_take of `entries` by `consumer` (started at once), with lease `lease_ms`.
async fn take_with(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    lease_ms: u64,
    entries: &[TakeEntry],
) -> Vec<TakeReply> {
    let cmd = calls::take(
        keys,
        &caller(consumer),
        Duration::from_millis(lease_ms),
        true,
        true,
        entries,
    );
    let rows = functions::call(c, &cmd, "take").await.unwrap();
    calls::parse_take(rows).unwrap()
}

/// fleetq_take of `(entry, job)` pairs with default limits; returns the replies and the
/// holdings (with their tokens).
async fn take(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    entries: &[(&str, &str)],
) -> (Vec<TakeReply>, Vec<Holding>) {
    let args: Vec<TakeEntry> = entries.iter().map(|(e, j)| entry(e, j)).collect();
    let replies = take_with(c, keys, consumer, 10_000, &args).await;
    (replies, args.into_iter().map(holding).collect())
}

fn holding(e: TakeEntry) -> Holding {
    Holding {
        entry_id: e.entry_id,
        token: e.token.unwrap(),
        job_id: e.job_id,
    }
}

async fn renew(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    h: &Holding,
) -> HoldReply {
    let cmd = calls::renew(keys, &caller(consumer), Duration::from_secs(10), &[h]);
    let r: Vec<String> = functions::call(c, &cmd, "renew").await.unwrap();
    HoldReply::parse("renew", &r[0]).unwrap()
}

async fn complete(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    h: &Holding,
    commit: &Commit,
) -> Committed {
    // The attempt the take answered, as a worker passes it back.
    let attempt: Option<u32> = redis::cmd("HGET")
        .arg(keys.job(&h.job_id))
        .arg("attempt")
        .query_async(c)
        .await
        .unwrap();
    let batch = [Completion {
        held: h,
        attempt: attempt.unwrap_or(0),
        commit,
        ending: &Ending::default(),
    }];
    let cmd = calls::complete(keys, &caller(consumer), &batch);
    let r: Vec<String> = functions::call(c, &cmd, "complete").await.unwrap();
    calls::parse_complete(r, 1).unwrap()[0]
}

async fn progress(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    h: &Holding,
) -> HoldReply {
    let cmd = calls::progress(
        keys,
        consumer,
        h,
        ProgressKind::Progress,
        r#"{"step":1}"#,
        "",
    );
    let r: String = functions::call(c, &cmd, "progress").await.unwrap();
    HoldReply::parse("progress", &r).unwrap()
}

/// Ages a pending entry's idle time to `idle_ms` (owner unchanged) without waiting.
async fn age(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    owner: &str,
    entry_id: &str,
    idle_ms: u64,
) {
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(keys.stream())
        .arg("workers")
        .arg(owner)
        .arg(0)
        .arg(entry_id)
        .arg("IDLE")
        .arg(idle_ms)
        .arg("JUSTID")
        .query_async(c)
        .await
        .unwrap();
}

/// Moves an entry's lease deadline into the past.
async fn lapse(c: &mut ConnectionManager, keys: &QueueKeys, entry_id: &str) {
    let _: i64 = redis::cmd("ZADD")
        .arg(keys.leases())
        .arg(1)
        .arg(entry_id)
        .query_async(c)
        .await
        .unwrap();
}

async fn reclaim(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    lease_ms: u64,
    free: usize,
) -> Vec<String> {
    let cmd = calls::reclaim(
        keys,
        &caller(consumer),
        Duration::from_millis(lease_ms),
        free,
    );
    let (entries, _, _): ReclaimReply = functions::call(c, &cmd, "reclaim").await.unwrap();
    entries.into_iter().map(|e| e.0).collect()
}

async fn pending(c: &mut ConnectionManager, keys: &QueueKeys) -> Vec<(String, String, u64, u64)> {
    redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(c)
        .await
        .unwrap()
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
    let (r, _) = take(&mut c, &keys, "w1", &[(&e1, "dup"), (&e2, "dup")]).await;
    assert_eq!(r[0].decision, TakeDecision::Run { attempt: 1 });
    assert_eq!(r[0].deliveries, 1);
    assert_eq!(
        r[1].decision,
        TakeDecision::Duplicate,
        "a second entry with a known id does not run"
    );
    let (r, _) = take(&mut c, &keys, "w2", &[(&e3, &e3)]).await;
    assert_eq!(r[0].decision, TakeDecision::Lost, "w2 does not own e3");
    let h = job_hash(&mut c, &keys, "dup").await;
    assert_eq!(h["state"], "running");
    assert_eq!(h["node"], "node-w1");
    assert_eq!(h["entry"], e1);
    assert_eq!(h["attempts"], "1", "started at once: the attempt counts");
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
    let mut late = entry(&e, &e);
    late.queue_deadline_ms = 1;
    let r = take_with(&mut c, &keys, "w1", 10_000, &[late]).await;
    assert_eq!(r[0].decision, TakeDecision::Expired);
    let h = job_hash(&mut c, &keys, &e).await;
    assert_eq!(h["state"], "expired");
    assert_eq!(h["timeout"], "queue");
}

#[tokio::test]
async fn take_refuses_arguments_of_another_protocol() {
    let (_s, keys, mut c) = setup().await;
    let mut cmd = fcall("fleetq_take", &keys);
    cmd.arg("w1")
        .arg("n")
        .arg(10_000)
        .arg(1)
        .arg("1-0")
        .arg("j")
        .arg(0);
    let err = functions::call::<redis::Value>(&mut c, &cmd, "take")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("11 per entry"), "{err}");
}

#[tokio::test]
async fn renew_checks_ownership_and_reports_cancel() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    let (_, held) = take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let h = &held[0];
    assert_eq!(renew(&mut c, &keys, "w1", h).await, HoldReply::Ok);
    assert_eq!(
        renew(&mut c, &keys, "w2", h).await,
        HoldReply::Lost,
        "another consumer cannot renew (nor steal) it"
    );
    let stale = Holding {
        token: Token::new(),
        ..h.clone()
    };
    assert_eq!(
        renew(&mut c, &keys, "w1", &stale).await,
        HoldReply::Lost,
        "another take's token is refused"
    );
    let owner = pending(&mut c, &keys).await;
    assert_eq!(owner[0].1, "w1");
    let mut cancel = fcall("fleetq_cancel", &keys);
    cancel.arg(&e);
    let (state,): (String,) = cancel.query_async(&mut c).await.unwrap();
    assert_eq!(state, "cancelling");
    assert_eq!(renew(&mut c, &keys, "w1", h).await, HoldReply::Cancel);
}

#[tokio::test]
async fn complete_is_fenced_and_all_or_nothing() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    let (_, held) = take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let done = Commit::Succeeded(r#"{"v":1}"#.into());
    assert_eq!(
        complete(&mut c, &keys, "w2", &held[0], &done).await,
        Committed::Fenced
    );
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
    assert_eq!(
        complete(&mut c, &keys, "w1", &held[0], &done).await,
        Committed::Ok
    );
    let h = job_hash(&mut c, &keys, &e).await;
    assert_eq!(h["state"], "succeeded");
    assert_eq!(h["result"], r#"{"v":1}"#);
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 0);
    assert!(pending(&mut c, &keys).await.is_empty());
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.job(&e))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0, "the finished job expires after its retention");
    // A second commit of the same take is fenced too.
    assert_eq!(
        complete(&mut c, &keys, "w1", &held[0], &done).await,
        Committed::Fenced
    );
}

/// underway's `fenced_attempts_ignore_stale_workers`, at the function level: A takes, its
/// lease runs out, B reclaims and takes; everything A tries afterwards is refused, B's commit
/// is recorded, and the job has exactly one success.
#[tokio::test]
async fn fenced_attempts_ignore_stale_workers() {
    let (s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}"), ("id", "j")]).await;
    read(&mut c, &keys, "a", 1).await;
    let (r, a) = take(&mut c, &keys, "a", &[(&e, "j")]).await;
    assert_eq!(r[0].decision, TakeDecision::Run { attempt: 1 });
    // A goes silent: its entry idles past the lease and its deadline passes.
    age(&mut c, &keys, "a", &e, 60_000).await;
    lapse(&mut c, &keys, &e).await;
    assert_eq!(
        reclaim(&mut c, &keys, "b", 10_000, 1).await,
        vec![e.clone()]
    );
    let (r, b) = take(&mut c, &keys, "b", &[(&e, "j")]).await;
    assert_eq!(r[0].decision, TakeDecision::Run { attempt: 2 });
    assert_eq!(renew(&mut c, &keys, "a", &a[0]).await, HoldReply::Lost);
    assert_eq!(progress(&mut c, &keys, "a", &a[0]).await, HoldReply::Lost);
    let late = Commit::Succeeded(r#""from a""#.into());
    assert_eq!(
        complete(&mut c, &keys, "a", &a[0], &late).await,
        Committed::Fenced
    );
    let on_time = Commit::Succeeded(r#""from b""#.into());
    assert_eq!(
        complete(&mut c, &keys, "b", &b[0], &on_time).await,
        Committed::Ok
    );
    let h = job_hash(&mut c, &keys, "j").await;
    assert_eq!(
        (h["state"].as_str(), h["result"].as_str()),
        ("succeeded", r#""from b""#)
    );
    assert_eq!(h["attempts"], "2");
    assert_eq!(s.stat("q", "succeeded").await, 1, "exactly one success");
    assert_eq!(s.stat("q", "fenced").await, 1);
    assert_eq!(
        s.stat("q", "timeout:lease").await,
        1,
        "A's node is blamed once"
    );
}

/// After a rollback (AOF everysec, a replica promoted) the same consumer can be handed the
/// same entry again with the same delivery count; the new take's token fences the old run.
#[tokio::test]
async fn a_new_take_of_the_same_entry_fences_the_old_one() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    read(&mut c, &keys, "w1", 1).await;
    let (_, old) = take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let (r, new) = take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    assert!(matches!(r[0].decision, TakeDecision::Run { .. }));
    assert_eq!(
        r[0].deliveries, 1,
        "the same delivery count as the old take"
    );
    assert_eq!(renew(&mut c, &keys, "w1", &old[0]).await, HoldReply::Lost);
    let done = Commit::Succeeded("1".into());
    assert_eq!(
        complete(&mut c, &keys, "w1", &old[0], &done).await,
        Committed::Fenced
    );
    assert_eq!(
        complete(&mut c, &keys, "w1", &new[0], &done).await,
        Committed::Ok
    );
}

/// A 4-slot worker whose own entries look stale (aged past the lease) does not reclaim them;
/// another worker does.
#[tokio::test]
async fn reclaim_never_takes_the_callers_own_entries() {
    let (_s, keys, mut c) = setup().await;
    let mut entries = Vec::new();
    for _ in 0..4 {
        entries.push(xadd(&mut c, &keys, &[("payload", "{}")]).await);
    }
    read(&mut c, &keys, "w1", 4).await;
    let pairs: Vec<(&str, &str)> = entries.iter().map(|e| (e.as_str(), e.as_str())).collect();
    take(&mut c, &keys, "w1", &pairs).await;
    for e in &entries {
        age(&mut c, &keys, "w1", e, 60_000).await;
        lapse(&mut c, &keys, e).await;
    }
    assert!(reclaim(&mut c, &keys, "w1", 10_000, 4).await.is_empty());
    assert!(pending(&mut c, &keys).await.iter().all(|p| p.1 == "w1"));
    assert_eq!(reclaim(&mut c, &keys, "w2", 10_000, 4).await.len(), 4);
}

/// A queue silent for longer than 1.5 leases (Redis was down or frozen) judges no lease
/// stale for one more lease, so live holders renew first.
#[tokio::test]
async fn a_quiet_spell_delays_stale_judgments_by_one_lease() {
    let (s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}"), ("max_attempts", "1")]).await;
    read(&mut c, &keys, "w1", 1).await;
    take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    age(&mut c, &keys, "w1", &e, 60_000).await;
    lapse(&mut c, &keys, &e).await;
    // The last worker call was a minute ago.
    let now = fleetq_broker::nodes::server_ms(&s.redis).await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(keys.stats())
        .arg("active_ms")
        .arg(now - 60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        reclaim(&mut c, &keys, "w2", 10_000, 1).await.is_empty(),
        "grace"
    );
    let mut expire = fcall("fleetq_expire", &keys);
    expire.arg(100);
    let (ended, _): (u64, u64) = expire.query_async(&mut c).await.unwrap();
    assert_eq!(ended, 0, "no dead letter during the grace");
    assert_eq!(s.stat("q", "quiet_spells").await, 1);
    // Once the grace is over, the stale entry is judged as usual.
    let _: () = redis::cmd("HSET")
        .arg(keys.stats())
        .arg("grace_until_ms")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(reclaim(&mut c, &keys, "w2", 10_000, 1).await, vec![e]);
}

/// A delivery that never reached fleetq_take costs no attempt: the reader died between its
/// XREADGROUP and the take, and the next holder's attempt is still the first.
#[tokio::test]
async fn attempts_count_when_a_job_starts_not_when_it_is_delivered() {
    let (_s, keys, mut c) = setup().await;
    let e = xadd(&mut c, &keys, &[("payload", "{}"), ("max_attempts", "1")]).await;
    read(&mut c, &keys, "died-before-take", 1).await;
    age(&mut c, &keys, "died-before-take", &e, 60_000).await;
    assert_eq!(
        reclaim(&mut c, &keys, "w2", 10_000, 1).await,
        vec![e.clone()]
    );
    let mut one = entry(&e, &e);
    one.max_attempts = 1;
    let r = take_with(&mut c, &keys, "w2", 10_000, &[one]).await;
    assert_eq!(r[0].deliveries, 2);
    assert_eq!(
        r[0].decision,
        TakeDecision::Run { attempt: 1 },
        "not dead-lettered"
    );
}

/// An entry of thousands of fields still reaches the dead letters (its first fields kept).
#[tokio::test]
async fn an_entry_with_thousands_of_fields_is_dead_lettered() {
    let (_s, keys, mut c) = setup().await;
    let mut fields: Vec<(String, String)> = vec![("payload".into(), "{x".into())];
    for i in 0..5000 {
        fields.push((format!("f{i}"), "v".into()));
    }
    let refs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(f, v)| (f.as_str(), v.as_str()))
        .collect();
    let e = xadd(&mut c, &keys, &refs).await;
    read(&mut c, &keys, "w1", 1).await;
    let (_, held) = take(&mut c, &keys, "w1", &[(&e, &e)]).await;
    let dead = Commit::Dead {
        reason: calls::DeadReason::Malformed,
        error: "payload is not JSON".into(),
    };
    assert_eq!(
        complete(&mut c, &keys, "w1", &held[0], &dead).await,
        Committed::Ok
    );
    let letters: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let m = &letters[0].1;
    assert_eq!(m["reason"], "malformed");
    assert_eq!(m["f:payload"], "{x");
    assert_eq!(m["fields_left_out"], "4937");
    assert!(pending(&mut c, &keys).await.is_empty());
}

/// A consumer whose process is gone: its entries go back in line at once, an exhausted one to
/// the dead letters, and the consumer is removed.
#[tokio::test]
async fn abandon_requeues_a_gone_consumers_entries() {
    let (_s, keys, mut c) = setup().await;
    let e1 = xadd(&mut c, &keys, &[("payload", "{}"), ("id", "a")]).await;
    let e2 = xadd(
        &mut c,
        &keys,
        &[("payload", "{}"), ("id", "b"), ("max_attempts", "1")],
    )
    .await;
    read(&mut c, &keys, "gone", 2).await;
    let mut last = entry(&e2, "b");
    last.max_attempts = 1;
    take_with(&mut c, &keys, "gone", 10_000, &[entry(&e1, "a"), last]).await;
    let cmd = calls::abandon(&keys, "gone");
    let (requeued, dead): (u64, u64) = functions::call(&mut c, &cmd, "abandon").await.unwrap();
    assert_eq!((requeued, dead), (1, 1));
    let h = job_hash(&mut c, &keys, "a").await;
    assert_eq!(
        (h["state"].as_str(), h["attempts"].as_str()),
        ("waiting", "1")
    );
    assert_eq!(job_hash(&mut c, &keys, "b").await["state"], "dead");
    assert!(pending(&mut c, &keys).await.is_empty());
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.stream())
        .arg("workers")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(consumers.is_empty(), "the gone consumer was removed");
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
        (vec![""], "payload is missing"),
        (vec!["{}", "colour", "red"], "unknown field"),
        (vec!["{}", "max_attempts", "0"], "from 1 to 1000000"),
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
    let e = xadd(
        &mut c,
        &keys,
        &[("payload", "{}"), ("max_attempts", "2"), ("attempts", "1")],
    )
    .await;
    let keep = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let unstarted = xadd(&mut c, &keys, &[("payload", "{}"), ("max_attempts", "1")]).await;
    read(&mut c, &keys, "dead-host", 3).await;
    // `e` started its last attempt, `keep` its first of three; `unstarted` was delivered on
    // its last attempt but never started. All three idle past the lease.
    let mut last = entry(&e, &e);
    (last.prior_attempts, last.max_attempts) = (1, 2);
    take_with(
        &mut c,
        &keys,
        "dead-host",
        10_000,
        &[last, entry(&keep, &keep)],
    )
    .await;
    for id in [&e, &keep, &unstarted] {
        age(&mut c, &keys, "dead-host", id, 60_000).await;
    }
    lapse(&mut c, &keys, &e).await;
    lapse(&mut c, &keys, &keep).await;
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
    let left: Vec<String> = pending(&mut c, &keys)
        .await
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        left,
        vec![keep, unstarted],
        "a job with attempts left, and one that never started, wait for a reclaim"
    );
}

/// The long form of a take of a plain job's first delivery: the 11 values a worker derives.
fn long_entry(entry_id: &str) -> TakeEntry {
    TakeEntry {
        entry_id: entry_id.into(),
        job_id: entry_id.into(),
        token: Some(Token::new()),
        max_attempts: fleetq_broker::QueueConfig::default().max_attempts,
        enqueued_ms: fleetq_broker::job::entry_ms(entry_id),
        ..TakeEntry::default()
    }
}

/// The take a worker sends for `entries` of the default queue config (the short form when they
/// all fit it).
fn take_as_worker(keys: &QueueKeys, consumer: &str, entries: &[TakeEntry]) -> redis::Cmd {
    calls::take_for(
        keys,
        &caller(consumer),
        Duration::from_secs(10),
        true,
        true,
        &fleetq_broker::QueueConfig::default(),
        entries,
    )
}

/// An FCALL of `function` (`fleetq_take_fresh`, `fleetq_take_next`) by w1 with well-formed
/// header values, for the entries' values to follow.
fn fresh_header(function: &str, keys: &QueueKeys) -> redis::Cmd {
    let mut cmd = fcall(function, keys);
    cmd.arg("w1")
        .arg("n")
        .arg(10_000)
        .arg(1)
        .arg(0)
        .arg(3)
        .arg(0);
    cmd
}

/// Whether `cmd` is an FCALL of `function`.
fn calls_function(cmd: &redis::Cmd, function: &str) -> bool {
    let packed = String::from_utf8_lossy(&cmd.get_packed_command()).into_owned();
    packed.split("\r\n").nth(4) == Some(function)
}

/// A job record without what differs between two jobs taken at different moments.
fn comparable(mut h: HashMap<String, String>) -> HashMap<String, String> {
    for f in [
        "entry",
        "enqueued_ms",
        "taken_ms",
        "attempt_started_ms",
        "started_ms",
        "ended_ms",
    ] {
        if let Some(v) = h.get_mut(f) {
            *v = "…".into();
        }
    }
    h
}

#[tokio::test]
async fn the_short_forms_record_what_the_long_ones_do() {
    let (_s, keys, mut c) = setup().await;
    let queue = fleetq_broker::QueueConfig::default();
    let a = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let b = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    assert_eq!(
        read(&mut c, &keys, "w1", 2).await,
        vec![a.clone(), b.clone()]
    );
    let (long, short) = (long_entry(&a), long_entry(&b));
    assert!(long.is_fresh(&queue) && short.is_fresh(&queue));
    // A: the long form; B: the short one, which the worker's builder picks for it.
    let replies = take_with(&mut c, &keys, "w1", 10_000, std::slice::from_ref(&long)).await;
    assert_eq!(replies[0].decision, TakeDecision::Run { attempt: 1 });
    let cmd = take_as_worker(&keys, "w1", std::slice::from_ref(&short));
    assert!(
        calls_function(&cmd, "fleetq_take_fresh"),
        "a plain first delivery is taken in the short form"
    );
    let rows = functions::call(&mut c, &cmd, "take").await.unwrap();
    let replies = calls::parse_take(rows).unwrap();
    assert_eq!(replies[0].decision, TakeDecision::Run { attempt: 1 });
    assert_eq!(replies[0].deliveries, 1);
    let (ha, hb) = (
        job_hash(&mut c, &keys, &a).await,
        job_hash(&mut c, &keys, &b).await,
    );
    assert_eq!(hb["state"], "running");
    assert_eq!(hb["entry"], b);
    assert_eq!(comparable(ha), comparable(hb));
    let holds: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.holds())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(holds.len(), 2, "both tokens are held: {holds:?}");
    let leases: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.leases())
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(leases, vec![a.clone(), b.clone()]);

    // A ends through fleetq_complete written out in full, B through the short form.
    let mut full = fcall("fleetq_complete", &keys);
    full.arg("w1")
        .arg("node-w1")
        .arg(&a)
        .arg(long.token.as_ref().unwrap().as_str())
        .arg(&a);
    full.arg("succeeded")
        .arg("{\"ok\":1}")
        .arg(0)
        .arg("")
        .arg("")
        .arg("")
        .arg(0)
        .arg("")
        .arg(1);
    let words: Vec<String> = full.query_async(&mut c).await.unwrap();
    assert_eq!(words, vec!["ok"]);
    let hb_holding = holding(short);
    let commit = Commit::Succeeded("{\"ok\":1}".into());
    let batch = [Completion {
        held: &hb_holding,
        attempt: 1,
        commit: &commit,
        ending: &Ending::default(),
    }];
    let cmd = calls::complete(&keys, &caller("w1"), &batch);
    assert!(calls_function(&cmd, "fleetq_complete_first"));
    let words: Vec<String> = functions::call(&mut c, &cmd, "complete").await.unwrap();
    assert_eq!(words, vec!["ok"]);
    let (ha, hb) = (
        job_hash(&mut c, &keys, &a).await,
        job_hash(&mut c, &keys, &b).await,
    );
    assert_eq!(hb["state"], "succeeded");
    assert_eq!(hb["result"], "{\"ok\":1}");
    assert_eq!(comparable(ha), comparable(hb));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.job(&b))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0, "an ended job's record expires: {ttl}");
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 0, "both entries are acknowledged and deleted");
    assert!(pending(&mut c, &keys).await.is_empty());
}

#[tokio::test]
async fn the_short_forms_keep_fencing_and_marks() {
    let (_s, keys, mut c) = setup().await;
    let a = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let b = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    // B is cancelled while waiting (its record ends, its entry is marked): the short take
    // finds the mark, reads the record and drops the entry, as the long one does.
    let mut cancel = fcall("fleetq_cancel", &keys);
    cancel.arg(&b);
    let _: redis::Value = cancel.query_async(&mut c).await.unwrap();
    read(&mut c, &keys, "w1", 2).await;
    let entries = [long_entry(&a), long_entry(&b)];
    let cmd = take_as_worker(&keys, "w1", &entries);
    let rows = functions::call(&mut c, &cmd, "take").await.unwrap();
    let replies = calls::parse_take(rows).unwrap();
    assert_eq!(replies[0].decision, TakeDecision::Run { attempt: 1 });
    assert_eq!(replies[1].decision, TakeDecision::Duplicate);
    assert_eq!(job_hash(&mut c, &keys, &b).await["state"], "cancelled");
    let pending_ids: Vec<String> = pending(&mut c, &keys)
        .await
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        pending_ids,
        vec![a.clone()],
        "the cancelled entry is dropped"
    );
    // Another consumer's short take of A is lost; a stale token's short commit is fenced.
    let cmd = take_as_worker(&keys, "w2", &[long_entry(&a)]);
    let rows = functions::call(&mut c, &cmd, "take").await.unwrap();
    assert_eq!(
        calls::parse_take(rows).unwrap()[0].decision,
        TakeDecision::Lost
    );
    let stale = Holding {
        entry_id: a.clone(),
        token: Token::new(),
        job_id: a.clone(),
    };
    assert_eq!(
        complete(&mut c, &keys, "w1", &stale, &Commit::Succeeded("1".into())).await,
        Committed::Fenced
    );
    assert_eq!(
        job_hash(&mut c, &keys, &a).await["state"],
        "running",
        "a fenced commit writes nothing"
    );
    let held = holding(entries[0].clone());
    assert_eq!(
        complete(&mut c, &keys, "w2", &held, &Commit::Succeeded("1".into())).await,
        Committed::Fenced
    );
    assert_eq!(
        complete(&mut c, &keys, "w1", &held, &Commit::Succeeded("1".into())).await,
        Committed::Ok
    );
    assert_eq!(job_hash(&mut c, &keys, &a).await["state"], "succeeded");
    // Refused: a short take of a malformed entry id or token.
    let mut bad = fresh_header("fleetq_take_fresh", &keys);
    bad.arg("x").arg("y");
    let err = bad.query_async::<redis::Value>(&mut c).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("expected an entry id and a token of 16 hex digits"),
        "{err}"
    );
}

#[tokio::test]
async fn a_take_finds_its_entries_in_any_order() {
    let (_s, keys, mut c) = setup().await;
    let ids = [
        xadd(&mut c, &keys, &[("payload", "{}")]).await,
        xadd(&mut c, &keys, &[("payload", "{}")]).await,
        xadd(&mut c, &keys, &[("payload", "{}")]).await,
    ];
    read(&mut c, &keys, "w1", 3).await;
    // Highest first, the lowest in the middle: the ownership range still spans all three.
    let order = [&ids[2], &ids[0], &ids[1]];
    let entries: Vec<TakeEntry> = order.iter().map(|id| long_entry(id)).collect();
    let replies = take_with(&mut c, &keys, "w1", 10_000, &entries).await;
    for (reply, id) in replies.iter().zip(order) {
        assert_eq!(&reply.entry_id, id);
        assert_eq!(reply.decision, TakeDecision::Run { attempt: 1 }, "{id}");
    }
}

/// `fleetq_take_next` by `consumer` of the default queue config: records `ends` and reads and
/// takes up to `tokens.len()` entries.
async fn take_next(
    c: &mut ConnectionManager,
    keys: &QueueKeys,
    consumer: &str,
    ends: &[Completion<'_>],
    tokens: &[Token],
) -> calls::TakeNextReply {
    let cmd = calls::take_next(
        keys,
        &caller(consumer),
        Duration::from_secs(10),
        true,
        true,
        &fleetq_broker::QueueConfig::default(),
        ends,
        tokens,
    )
    .expect("first-attempt successes only");
    let rows: calls::TakeNextRows = functions::call(c, &cmd, "take next").await.unwrap();
    calls::parse_take_next(rows, ends.len(), tokens).unwrap()
}

/// The end of a first attempt of `held`.
fn first_end<'a>(held: &'a Holding, commit: &'a Commit, ending: &'a Ending) -> Completion<'a> {
    Completion {
        held,
        attempt: 1,
        commit,
        ending,
    }
}

fn tokens(n: usize) -> Vec<Token> {
    (0..n).map(|_| Token::new()).collect()
}

#[tokio::test]
async fn a_turn_in_one_call_records_and_takes_what_the_separate_calls_do() {
    let (_s, keys, mut c) = setup().await;
    let a = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let b = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    // A through the separate calls (read, short take, short completion) as the reference.
    read(&mut c, &keys, "w1", 1).await;
    let long = long_entry(&a);
    let rows = functions::call(
        &mut c,
        &take_as_worker(&keys, "w1", std::slice::from_ref(&long)),
        "take",
    )
    .await
    .unwrap();
    assert_eq!(
        calls::parse_take(rows).unwrap()[0].decision,
        TakeDecision::Run { attempt: 1 }
    );
    let running_a = job_hash(&mut c, &keys, &a).await;
    // B read and taken in one call: with the token given for it, a record like A's.
    let t = tokens(2);
    let next = take_next(&mut c, &keys, "w1", &[], &t).await;
    assert!(next.ends.is_empty() && next.untaken.is_empty() && next.read_error.is_none());
    assert_eq!(next.taken.len(), 1, "only B is waiting");
    let (reply, token, (id, fields)) = &next.taken[0];
    assert_eq!((&reply.entry_id, id), (&b, &b));
    assert_eq!(reply.decision, TakeDecision::Run { attempt: 1 });
    assert_eq!(reply.deliveries, 1);
    assert_eq!(token, &t[0], "the first token goes to the first entry read");
    assert_eq!(
        fields.len(),
        1,
        "the entry comes with its fields: {fields:?}"
    );
    assert_eq!(fields[0].0, b"payload");
    assert_eq!(
        comparable(running_a),
        comparable(job_hash(&mut c, &keys, &b).await)
    );
    let leases: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.leases())
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(leases, vec![a.clone(), b.clone()], "both are leased");

    // Both end in one call that reads nothing more (nothing waits).
    let (ha, hb) = (
        holding(long),
        Holding {
            entry_id: b.clone(),
            token: t[0].clone(),
            job_id: b.clone(),
        },
    );
    let commit = Commit::Succeeded("{\"ok\":1}".into());
    let ending = Ending::default();
    let ends = [&ha, &hb].map(|held| first_end(held, &commit, &ending));
    let next = take_next(&mut c, &keys, "w1", &ends, &tokens(8)).await;
    assert_eq!(next.ends, vec![Committed::Ok, Committed::Ok]);
    assert!(next.taken.is_empty());
    let (ra, rb) = (
        job_hash(&mut c, &keys, &a).await,
        job_hash(&mut c, &keys, &b).await,
    );
    assert_eq!(rb["state"], "succeeded");
    assert_eq!(rb["result"], "{\"ok\":1}");
    assert_eq!(comparable(ra), comparable(rb));
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 0, "both entries are acknowledged and deleted");
    assert!(pending(&mut c, &keys).await.is_empty());
    let holds: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.holds())
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(holds.is_empty(), "no token is left held: {holds:?}");
}

#[tokio::test]
async fn a_turn_in_one_call_keeps_fencing_marks_and_what_it_must_not_take() {
    let (_s, keys, mut c) = setup().await;
    let plain = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let named = xadd(&mut c, &keys, &[("payload", "{}"), ("id", "job-n")]).await;
    let cancelled = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let bad = xadd(&mut c, &keys, &[("payload", "not json")]).await;
    let mut cancel = fcall("fleetq_cancel", &keys);
    cancel.arg(&cancelled);
    let _: redis::Value = cancel.query_async(&mut c).await.unwrap();

    // A stale token's end is fenced, and the read goes on.
    let stale = Holding {
        entry_id: plain.clone(),
        token: Token::new(),
        job_id: plain.clone(),
    };
    let commit = Commit::Succeeded("1".into());
    let ending = Ending::default();
    let end = [first_end(&stale, &commit, &ending)];
    let t = tokens(8);
    let next = take_next(&mut c, &keys, "w1", &end, &t).await;
    assert_eq!(next.ends, vec![Committed::Fenced]);
    let decisions: Vec<(String, TakeDecision)> = next
        .taken
        .iter()
        .map(|(r, _, _)| (r.entry_id.clone(), r.decision))
        .collect();
    assert_eq!(
        decisions,
        vec![
            (plain.clone(), TakeDecision::Run { attempt: 1 }),
            (cancelled.clone(), TakeDecision::Duplicate),
            // Not the function's to judge: the worker dead-letters it, fenced by its token.
            (bad.clone(), TakeDecision::Run { attempt: 1 }),
        ]
    );
    // An entry with a job id of its own is read but left to fleetq_take.
    assert_eq!(next.untaken.len(), 1);
    assert_eq!(next.untaken[0].0, named);
    assert!(job_hash(&mut c, &keys, "job-n")
        .await
        .get("state")
        .is_none_or(|s| s != "running"));
    let replies = take(&mut c, &keys, "w1", &[(&named, "job-n")]).await.0;
    assert_eq!(replies[0].decision, TakeDecision::Run { attempt: 1 });
    assert_eq!(
        job_hash(&mut c, &keys, &cancelled).await["state"],
        "cancelled"
    );

    // Another consumer cannot end what w1 holds, even with its token.
    let held = Holding {
        entry_id: plain.clone(),
        token: next.taken[0].1.clone(),
        job_id: plain.clone(),
    };
    let end = [first_end(&held, &commit, &ending)];
    assert_eq!(
        take_next(&mut c, &keys, "w2", &end, &[]).await.ends,
        vec![Committed::Fenced]
    );
    assert_eq!(
        take_next(&mut c, &keys, "w1", &end, &[]).await.ends,
        vec![Committed::Ok]
    );
    assert_eq!(job_hash(&mut c, &keys, &plain).await["state"], "succeeded");
}

#[tokio::test]
async fn a_turn_whose_read_fails_still_records_its_ends() {
    let (_s, keys, mut c) = setup().await;
    let a = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let t = tokens(1);
    let next = take_next(&mut c, &keys, "w1", &[], &t).await;
    let held = Holding {
        entry_id: a.clone(),
        token: t[0].clone(),
        job_id: a.clone(),
    };
    // The group goes (the stream deleted and made again, say): the end is recorded all the
    // same and the read says why it failed.
    assert_eq!(next.taken.len(), 1);
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(keys.stream())
        .arg("workers")
        .query_async(&mut c)
        .await
        .unwrap();
    let commit = Commit::Succeeded("1".into());
    let ending = Ending::default();
    let end = [first_end(&held, &commit, &ending)];
    let next = take_next(&mut c, &keys, "w1", &end, &tokens(4)).await;
    assert_eq!(next.ends, vec![Committed::Ok]);
    let why = next.read_error.expect("the read failed");
    assert!(why.starts_with("NOGROUP"), "{why}");
    assert_eq!(job_hash(&mut c, &keys, &a).await["state"], "succeeded");
    // Refused before anything is written: a token that is not 16 hex digits.
    let mut bad = fresh_header("fleetq_take_next", &keys);
    bad.arg(0).arg("nothex");
    let err = bad.query_async::<redis::Value>(&mut c).await.unwrap_err();
    assert!(err.to_string().contains("is not 16 hex digits"), "{err}");
}

#[tokio::test]
async fn a_turn_in_one_call_expires_what_waited_past_its_queue_timeout() {
    let (_s, keys, mut c) = setup().await;
    // The first entry's id says it was added a minute ago (ids carry their time), the second
    // one now. With a queue timeout of 30 s, the first waited past it, the second did not.
    let a_minute_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 60_000;
    let late: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg(format!("{a_minute_ago}-0"))
        .arg("payload")
        .arg("{}")
        .query_async(&mut c)
        .await
        .unwrap();
    let fresh = xadd(&mut c, &keys, &[("payload", "{}")]).await;
    let queue = fleetq_broker::QueueConfig {
        queue_timeout: Some(Duration::from_secs(30)),
        ..fleetq_broker::QueueConfig::default()
    };
    let t = tokens(2);
    let cmd = calls::take_next(
        &keys,
        &caller("w1"),
        Duration::from_secs(10),
        true,
        false,
        &queue,
        &[],
        &t,
    )
    .unwrap();
    let rows: calls::TakeNextRows = functions::call(&mut c, &cmd, "take next").await.unwrap();
    let next = calls::parse_take_next(rows, 0, &t).unwrap();
    let decisions: Vec<(String, TakeDecision)> = next
        .taken
        .iter()
        .map(|(r, _, _)| (r.entry_id.clone(), r.decision))
        .collect();
    assert_eq!(
        decisions,
        vec![
            (late.clone(), TakeDecision::Expired),
            (fresh.clone(), TakeDecision::Run { attempt: 1 }),
        ]
    );
    let h = job_hash(&mut c, &keys, &late).await;
    assert_eq!(
        (h["state"].as_str(), h["timeout"].as_str()),
        ("expired", "queue")
    );
    assert_eq!(job_hash(&mut c, &keys, &fresh).await["state"], "running");
}
