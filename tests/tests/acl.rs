//! Least privilege by role: every role runs under the Redis ACL user that docs/operations.md
//! gives it ("ACL users by role"), and is refused what it does not need.
//!
//! The `ACL SETUSER` lines are read from the documentation itself (placeholders `PASSWORD`,
//! `QUEUE`, `NODE` filled in), so the document cannot drift from what the code needs:
//!
//! - statically, each line must allow exactly the commands of its row in the document's
//!   table, and that row's "inside those functions" must be what the Lua of the functions it
//!   names really sends (helpers followed);
//! - on a real server (Redis 7.0 as Debian ships it; Valkey 8.1 too when its binary is
//!   installed, else those tests print why they skip), a producer, worker processes and a
//!   broker run their jobs under their users with nothing refused (`ACL LOG` stays empty:
//!   a refusal inside a function that the function swallows shows there too), and the
//!   refusals hold: no `FUNCTION LOAD` for a worker or producer, no other queue, no other
//!   node's record;
//! - a worker started before the library waits, says why, and starts once the broker's
//!   user loads it (`fleetq functions load`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use fleetq_broker::functions::{self, LibraryState};
use fleetq_broker::local_redis::LocalRedisOptions;
use fleetq_broker::service::BrokerConfig;
use fleetq_broker::{
    inspect, liveness, nodes, EnqueueOptions, Error, JobState, LocalRedis, Producer, QueueKeys,
    Redis,
};
use fleetq_tests::{bin_path, direct_connection, eventually, send_signal, WorkerProcess};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The operations guide, whose ACL section this suite runs.
const GUIDE: &str = include_str!("../../docs/operations.md");

/// The password every test user gets.
const PASSWORD: &str = "s3cret-role-pw";
/// The queue the roles serve.
const QUEUE: &str = "a";
/// A queue none of the producer's and workers' users may touch.
const OTHER_QUEUE: &str = "b";

// ---------------------------------------------------------------------------------------
// The guide's ACL section.

/// The `ACL SETUSER` commands of the guide's fenced code blocks (a line ending in `\`
/// continues on the next).
fn acl_lines() -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut current: Option<String> = None;
    for line in GUIDE.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            continue;
        }
        let text = line.trim();
        let body = text.trim_end_matches('\\').trim();
        let mut joined = match current.take() {
            Some(c) => format!("{c} {body}"),
            None if text.starts_with("ACL SETUSER ") => body.to_owned(),
            None => continue,
        };
        if text.ends_with('\\') {
            current = Some(std::mem::take(&mut joined));
        } else {
            out.push(joined);
        }
    }
    out
}

/// The words after `ACL SETUSER` of the guide's line for user `template` (as written, e.g.
/// `fleetq-worker-NODE`).
fn rules_of(template: &str) -> Vec<String> {
    let lines = acl_lines();
    let found = lines.iter().find_map(|l| {
        let words: Vec<String> = l.split_whitespace().skip(2).map(str::to_owned).collect();
        (words.first().map(String::as_str) == Some(template)).then_some(words)
    });
    found.unwrap_or_else(|| {
        panic!("docs/operations.md has no `ACL SETUSER {template} …` line in a code block; it has: {lines:#?}")
    })
}

/// The guide's line for `template` with the placeholders filled in.
fn rules_for(template: &str, queue: &str, node: &str) -> Vec<String> {
    rules_of(template)
        .into_iter()
        .map(|w| {
            w.replace("PASSWORD", PASSWORD)
                .replace("QUEUE", queue)
                .replace("NODE", node)
        })
        .collect()
}

/// The commands a line allows (`+cmd`, `+cmd|sub`), lower case.
fn allowed(rules: &[String]) -> BTreeSet<String> {
    rules
        .iter()
        .filter_map(|r| r.strip_prefix('+'))
        .map(str::to_lowercase)
        .collect()
}

/// The key patterns of a line (`~pattern`).
fn key_patterns(rules: &[String]) -> Vec<String> {
    rules
        .iter()
        .filter_map(|r| r.strip_prefix('~'))
        .map(str::to_owned)
        .collect()
}

/// One row of the guide's "calls these functions | sends itself | inside those functions"
/// table.
#[derive(Debug)]
struct RoleRow {
    functions: BTreeSet<String>,
    direct: BTreeSet<String>,
    inner: BTreeSet<String>,
}

/// The rows of that table, by role.
fn role_rows() -> BTreeMap<String, RoleRow> {
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in GUIDE.lines() {
        if line.starts_with("| role | calls these functions |") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 4 || cells[0].starts_with("---") {
            continue;
        }
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        };
        let commands = |cell: &str| -> BTreeSet<String> {
            ticked(cell)
                .into_iter()
                .filter(|t| {
                    !t.is_empty()
                        && t.chars()
                            .all(|c| c.is_ascii_uppercase() || c == '_' || c == ' ')
                })
                .map(|t| t.to_lowercase().replace(' ', "|"))
                .collect()
        };
        rows.insert(
            cells[0].to_owned(),
            RoleRow {
                functions: ticked(cells[1])
                    .into_iter()
                    .filter(|t| t.starts_with("fleetq_"))
                    .collect(),
                direct: commands(cells[2]),
                inner: commands(cells[3]),
            },
        );
    }
    assert!(
        !rows.is_empty(),
        "docs/operations.md lost its `| role | calls these functions | …` table"
    );
    rows
}

// ---------------------------------------------------------------------------------------
// What the Lua sends.

/// The library's Lua: helper and function bodies by name, and the registered functions with
/// the helper that implements each.
struct Lua {
    bodies: HashMap<String, String>,
    registered: BTreeMap<String, Option<String>>,
}

impl Lua {
    fn parse() -> Self {
        let mut bodies: HashMap<String, String> = HashMap::new();
        let mut registered = BTreeMap::new();
        for (_, src) in functions::SOURCES {
            let mut current: Option<String> = None;
            for raw in src.lines() {
                let line = raw.split("--").next().unwrap_or("");
                if let Some(rest) = line.strip_prefix("local function ") {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    bodies.insert(name.clone(), String::new());
                    current = Some(name);
                }
                if let Some(name) = &current {
                    let body = bodies.get_mut(name).unwrap();
                    body.push_str(line);
                    body.push('\n');
                }
                // A function ends at an `end` in column 0, or on its own line (`… end`).
                if line.starts_with("end")
                    || (line.starts_with("local function ") && line.trim_end().ends_with(" end"))
                {
                    current = None;
                }
                if let Some(rest) = line.strip_prefix("register('") {
                    let (name, rest) = rest.split_once("', ").unwrap();
                    let imp: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    registered.insert(name.to_owned(), Some(imp));
                }
                if let Some(rest) = line.split("function_name = '").nth(1) {
                    if line.contains("redis.register_function") && !line.contains("= name") {
                        let name = rest.split('\'').next().unwrap();
                        // Inline callback (fleetq_version): it sends no command.
                        assert!(
                            line.contains("return LIBRARY_VERSION"),
                            "an inline function this test cannot follow: {line}"
                        );
                        registered.insert(name.to_owned(), None);
                    }
                }
            }
        }
        assert!(registered.len() > 10, "found only {registered:?}");
        Self { bodies, registered }
    }

    /// The Redis commands a body names itself: `redis.call('X'`, `pcall(redis.call, 'X'`,
    /// and argument tables `{ 'X', …` passed to `redis.call(unpack(…))`; a container
    /// command's subcommand as `x|sub`.
    fn direct(body: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for opener in [
            "redis.call('",
            "redis.pcall('",
            "pcall(redis.call, '",
            "{ '",
        ] {
            for piece in body.split(opener).skip(1) {
                let word: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase())
                    .collect();
                if word.is_empty() || !piece[word.len()..].starts_with('\'') {
                    continue;
                }
                let mut cmd = word.to_lowercase();
                if ["XINFO", "XGROUP", "CLIENT", "FUNCTION", "OBJECT", "CONFIG"]
                    .contains(&word.as_str())
                {
                    let sub: String = piece[word.len()..]
                        .trim_start_matches("', '")
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase())
                        .collect();
                    cmd = format!("{cmd}|{}", sub.to_lowercase());
                }
                out.insert(cmd);
            }
        }
        out
    }

    /// Every command `name` sends, through the helpers it calls.
    fn sends(&self, name: &str, seen: &mut BTreeSet<String>) -> BTreeSet<String> {
        if !seen.insert(name.to_owned()) {
            return BTreeSet::new();
        }
        let body = &self.bodies[name];
        let mut out = Self::direct(body);
        for other in self.bodies.keys() {
            if other != name && calls(body, other) {
                out.extend(self.sends(other, seen));
            }
        }
        out
    }

    /// Every command the registered function `function` sends.
    fn function_sends(&self, function: &str) -> BTreeSet<String> {
        match self.registered.get(function) {
            None => panic!(
                "{function} is not a function of the library ({:?})",
                self.registered.keys()
            ),
            Some(None) => BTreeSet::new(),
            Some(Some(imp)) => self.sends(imp, &mut BTreeSet::new()),
        }
    }
}

/// Whether `body` calls the helper `name` (`name(` not preceded by an identifier character).
fn calls(body: &str, name: &str) -> bool {
    let pattern = format!("{name}(");
    body.match_indices(&pattern).any(|(i, _)| {
        body[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'))
    })
}

/// The guide's table and lines match each other and the Lua: each role's line allows exactly
/// what it sends itself plus what its functions send inside, every function has a role, the
/// key patterns are the documented ones, and only the broker may load functions.
#[test]
fn each_line_allows_exactly_what_its_role_sends() {
    let lua = Lua::parse();
    let rows = role_rows();
    let templates = [
        ("producer", "fleetq-producer"),
        ("worker", "fleetq-worker-NODE"),
        ("broker", "fleetq-broker"),
    ];
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["broker", "producer", "worker"]
    );
    let mut covered = BTreeSet::new();
    for (role, template) in templates {
        let row = &rows[role];
        // XACKDEL is sent only on servers that have it (Redis ≥ 8.2), where the guide says to
        // add it; Redis 7.0 refuses a line that names it.
        let inner: BTreeSet<String> = row
            .functions
            .iter()
            .flat_map(|f| lua.function_sends(f))
            .filter(|c| c != "xackdel")
            .collect();
        assert_eq!(
            row.inner, inner,
            "{role}: the guide's \"inside those functions\" differs from the Lua of {:?}\n  missing from the guide: {:?}\n  not sent: {:?}",
            row.functions,
            inner.difference(&row.inner).collect::<Vec<_>>(),
            row.inner.difference(&inner).collect::<Vec<_>>()
        );
        let rules = rules_of(template);
        let line: BTreeSet<String> = allowed(&rules);
        let needed: BTreeSet<String> = row.direct.union(&inner).cloned().collect();
        assert_eq!(
            line, needed,
            "{role}: the ACL line differs from the table\n  missing from the line: {:?}\n  not needed: {:?}",
            needed.difference(&line).collect::<Vec<_>>(),
            line.difference(&needed).collect::<Vec<_>>()
        );
        for r in &rules {
            assert!(
                !r.starts_with("+@")
                    && !r.starts_with("~*")
                    && *r != "allkeys"
                    && *r != "allcommands",
                "{role}: {r} grants more than the role needs"
            );
        }
        assert!(rules.contains(&"reset".to_owned()) && rules.contains(&"-@all".to_owned()));
        assert_eq!(
            line.contains("function|load"),
            role == "broker",
            "{role}: only the broker loads the library"
        );
        covered.extend(row.functions.iter().cloned());
    }
    assert_eq!(
        covered,
        lua.registered.keys().cloned().collect::<BTreeSet<_>>(),
        "every function of the library belongs to a role in the guide's table"
    );
    assert_eq!(
        key_patterns(&rules_of("fleetq-producer")),
        ["fleetq:{QUEUE}:*", "fleetq:{QUEUE#*}:*"]
    );
    assert_eq!(
        key_patterns(&rules_of("fleetq-worker-NODE")),
        ["fleetq:{QUEUE}:*", "fleetq:{QUEUE#*}:*", "fleetq:node:NODE"]
    );
    assert_eq!(key_patterns(&rules_of("fleetq-broker")), ["fleetq:*"]);
    // The node record key and the queue keys are built where the patterns say.
    let keys = QueueKeys::new("x").unwrap();
    assert!(
        keys.stream().starts_with("fleetq:{x}:") && keys.notify("j").starts_with("fleetq:{x}:")
    );
    assert_eq!(fleetq_broker::keys::node("n"), "fleetq:node:n");
}

// ---------------------------------------------------------------------------------------
// Servers and users.

/// Which server program runs the tests.
#[derive(Debug, Clone)]
struct Flavor {
    name: &'static str,
    program: Option<PathBuf>,
}

impl Flavor {
    /// Debian's `redis-server` (7.0) from `PATH`.
    fn redis() -> Self {
        Self {
            name: "redis",
            program: None,
        }
    }

    /// `valkey-server`, found by the harness (`fleetq_tests::Server::Valkey`). `None` (after
    /// printing why and how to install it) when there is none.
    fn valkey() -> Option<Self> {
        match fleetq_tests::Server::Valkey.program() {
            Ok(program) => Some(Self {
                name: "valkey",
                program,
            }),
            Err(e) => {
                eprintln!("SKIPPED on Valkey: {e}");
                None
            }
        }
    }
}

/// A fresh server (no function library) and an administrator's handle on it (the default
/// user, which may do anything).
struct Server {
    flavor: Flavor,
    local: LocalRedis,
    admin: Redis,
}

impl Server {
    async fn start(flavor: Flavor) -> Self {
        let local = LocalRedis::start_with(LocalRedisOptions {
            program: flavor.program.clone(),
            ..LocalRedisOptions::default()
        })
        .expect("start the server");
        let admin = Redis::connect(&local.url()).await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut admin.conn())
            .await
            .unwrap();
        // Valkey reports a redis_version too (7.2.4, the Redis it forked from): its own first.
        let version = ["valkey_version:", "redis_version:"]
            .iter()
            .find_map(|f| info.lines().find(|l| l.starts_with(f)))
            .unwrap_or("version unknown");
        eprintln!("{}: {version}", flavor.name);
        Self {
            flavor,
            local,
            admin,
        }
    }

    /// Creates a user from the guide's line for `template`; returns its URL.
    async fn user(&self, template: &str, queue: &str, node: &str) -> String {
        let name = rules_for(template, queue, node)[0].clone();
        self.user_named(&name, template, queue, node).await
    }

    /// Like [`Server::user`], under another user name.
    async fn user_named(&self, name: &str, template: &str, queue: &str, node: &str) -> String {
        let mut rules = rules_for(template, queue, node);
        rules[0] = name.to_owned();
        let accepted: redis::RedisResult<String> = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&rules)
            .query_async(&mut self.admin.conn())
            .await;
        assert_eq!(
            accepted.as_deref(),
            Ok("OK"),
            "{} refused the guide's line for {template}: {rules:?}",
            self.flavor.name
        );
        format!(
            "redis://{name}:{PASSWORD}@127.0.0.1:{}/0",
            self.local.port()
        )
    }

    /// `ACL LOG` as `user: object (reason, context)` lines, leaving out `CLIENT SETINFO`
    /// (the client library's, ignored by it; not a command on Redis 7.0).
    async fn acl_log(&self) -> Vec<String> {
        // Without a count, ACL LOG shows only the last 10.
        let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
            .arg("LOG")
            .arg(1000)
            .query_async(&mut self.admin.conn())
            .await
            .unwrap();
        let text = |e: &HashMap<String, redis::Value>, k: &str| {
            e.get(k)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        let mut setinfo = 0;
        for e in &entries {
            if text(e, "object") == "client|setinfo" {
                setinfo += 1;
                continue;
            }
            out.push(format!(
                "{}: {} ({}, {})",
                text(e, "username"),
                text(e, "object"),
                text(e, "reason"),
                text(e, "context")
            ));
        }
        // Redis groups equal refusals only within 60 s: the same refusal twice, a minute
        // apart on a slow machine, is two entries. Each kind counts once.
        let mut seen = BTreeSet::new();
        out.retain(|line| seen.insert(line.clone()));
        if setinfo > 0 {
            eprintln!(
                "{}: {setinfo} ACL LOG entries for client|setinfo left out (see the guide's note)",
                self.flavor.name
            );
        }
        out
    }

    /// A field of the queue's stats hash, 0 when absent.
    async fn stat(&self, field: &str) -> i64 {
        let v: Option<i64> = redis::cmd("HGET")
            .arg(QueueKeys::new(QUEUE).unwrap().stats())
            .arg(field)
            .query_async(&mut self.admin.conn())
            .await
            .unwrap();
        v.unwrap_or(0)
    }

    async fn node_field(&self, node: &str, field: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(fleetq_broker::keys::node(node))
            .arg(field)
            .query_async(&mut self.admin.conn())
            .await
            .unwrap()
    }

    async fn library(&self) -> LibraryState {
        functions::check(&mut self.admin.conn()).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the {} server's log ---\n{}",
                self.flavor.name,
                self.local.log_tail(fleetq_tests::LOG_TAIL_LINES)
            );
        }
    }
}

/// A broker running in this test process under `redis`'s user.
struct Broker {
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Broker {
    async fn start(redis: Redis) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let config = BrokerConfig {
            queues: vec![QUEUE.to_owned()],
            maintenance_interval: Duration::from_millis(100),
            ..BrokerConfig::default()
        };
        let s = stop.clone();
        let task = tokio::spawn(async move {
            fleetq_broker::service::run(
                redis,
                listener,
                config,
                async move { s.cancelled().await },
            )
            .await
            .expect("broker run");
        });
        Self { base, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Passes when `reply` is a `NOPERM` refusal; panics naming `what` otherwise.
fn refused<T: std::fmt::Debug>(what: &str, reply: redis::RedisResult<T>) {
    match reply {
        Err(e) if e.code() == Some("NOPERM") => {}
        other => panic!("{what}: expected NOPERM, got {other:?}"),
    }
}

/// Sends `command` (words split at spaces) and expects `NOPERM`, for each.
async fn refuse_all(redis: &Redis, commands: &[&str]) {
    for c in commands {
        refused(c, line(redis, c).await);
    }
}

/// Sends `command`, its words split at spaces.
async fn line(redis: &Redis, command: &str) -> redis::RedisResult<redis::Value> {
    raw(redis, &command.split(' ').collect::<Vec<_>>()).await
}

async fn raw(redis: &Redis, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut redis.conn()).await
}

/// Runs the `fleetq` CLI with `args` against `url`.
fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(bin_path("fleetq"))
        .args(["--redis-url", url])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run fleetq")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn running_on(p: &Producer, id: &str, node: &str) -> bool {
    let st = p.status(id).await.unwrap();
    st.state == JobState::Running && st.node.as_deref() == Some(node)
}

// ---------------------------------------------------------------------------------------
// Every role at work under its own user.

async fn roles_work_under_their_own_users(flavor: Flavor) {
    let s = Server::start(flavor).await;
    let broker_url = s.user("fleetq-broker", QUEUE, "").await;
    let producer_url = s.user("fleetq-producer", QUEUE, "").await;
    let w1_url = s.user("fleetq-worker-NODE", QUEUE, "gpu-1").await;
    let w2_url = s.user("fleetq-worker-NODE", QUEUE, "gpu-2").await;
    let keys = QueueKeys::new(QUEUE).unwrap();
    // A long lease: the killed worker's job must move on by crash detection, not by its lease.
    fleetq_broker::QueueConfig {
        lease: Duration::from_secs(30),
        ..Default::default()
    }
    .store(&mut s.admin.conn(), &keys)
    .await
    .unwrap();

    // The broker loads the library at start, under its own user.
    let broker_redis = Redis::connect(&broker_url).await.unwrap();
    let broker = Broker::start(broker_redis.clone()).await;
    eventually(
        Duration::from_secs(10),
        "the broker loaded the library",
        || async { s.library().await == LibraryState::Current(functions::library_version()) },
    )
    .await;

    // The producer: the library is current, so it never tries to load it.
    let p = Producer::new(&Redis::connect(&producer_url).await.unwrap(), QUEUE)
        .await
        .unwrap();

    // A worker (that hangs on what it takes) creates the group and holds the first job.
    let w2 = WorkerProcess::spawn(&w2_url, QUEUE, "gpu-2", 1, &["--mode", "hang"]);
    let held = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(held.created && held.position >= 1, "{held:?}");
    eventually(
        Duration::from_secs(15),
        "the first job running on gpu-2",
        || running_on(&p, &held.id, "gpu-2"),
    )
    .await;

    // Expiry by the broker's maintenance: nobody is free to take this one.
    let expiring = p
        .enqueue(
            &json!({}),
            &EnqueueOptions {
                queue_timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the broker expired the job",
        || async { p.status(&expiring.id).await.unwrap().state == JobState::Expired },
    )
    .await;

    // Status with a position, and cancels of a waiting and of a scheduled job.
    let waiting = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.status(&waiting.id).await.unwrap();
    assert_eq!(st.state, JobState::Waiting);
    assert!(st.position.is_some_and(|n| n >= 1), "{st:?}");
    assert_eq!(p.cancel(&waiting.id).await.unwrap(), JobState::Cancelled);
    let scheduled = p
        .enqueue(
            &json!({}),
            &EnqueueOptions {
                delay: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(scheduled.state, JobState::Scheduled);
    assert_eq!(p.cancel(&scheduled.id).await.unwrap(), JobState::Cancelled);

    // A second worker; then the first one is killed, and the broker's crash detection (under
    // the broker's user, driven tick by tick) puts its job back in line for the second.
    let w1 = WorkerProcess::spawn(&w1_url, QUEUE, "gpu-1", 1, &["--heartbeat-ms", "200"]);
    eventually(Duration::from_secs(15), "gpu-1's node record", || async {
        s.node_field("gpu-1", "last_seen_ms").await.is_some()
    })
    .await;
    let queues = vec![keys.clone()];
    let mut seen = liveness::Liveness::new();
    liveness::tick(&broker_redis, &queues, &mut seen)
        .await
        .unwrap();
    tokio::time::sleep(liveness::GONE_AFTER).await; // the broker's own clock, not a wait for a condition
    liveness::tick(&broker_redis, &queues, &mut seen)
        .await
        .unwrap();
    assert_eq!(
        s.stat("abandoned").await,
        0,
        "gpu-2 is alive: nothing moves"
    );
    w2.signal(libc::SIGKILL);
    let killed = std::time::Instant::now();
    while s.stat("abandoned").await == 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "gpu-2's job not put back in line"
        );
        tokio::time::sleep(liveness::DEFAULT_INTERVAL).await; // the broker's tick
        liveness::tick(&broker_redis, &queues, &mut seen)
            .await
            .unwrap();
    }
    let st = p.wait(&held.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}\n{}", w1.log());
    assert_eq!(st.result.unwrap()["node"], "gpu-1");

    // A large payload goes around the functions (MULTI, XADD, XINFO GROUPS, XLEN as the
    // producer's user) and runs under the worker's.
    let large = json!({ "blob": "x".repeat(fleetq_broker::producer::PLAIN_PAYLOAD_BYTES) });
    let big = p.enqueue(&large, &EnqueueOptions::default()).await.unwrap();
    assert!(big.created && big.position >= 1, "{big:?}");
    let st = p.wait(&big.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}\n{}", w1.log());

    // The worker heartbeats its own record (between beats with news it only renews the
    // record's time to live: the broker reads the last heartbeat from the expiry).
    let seen = || async {
        nodes::list(&broker_redis)
            .await
            .unwrap()
            .into_iter()
            .find(|n| n.node == "gpu-1")
            .map(|n| n.last_seen_ms())
    };
    let first = seen().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "a newer heartbeat of gpu-1",
        || async { seen().await.unwrap() > first },
    )
    .await;

    // Batches, and a job that succeeds with its result.
    let batch = p
        .enqueue_batch(&[
            json!({"result": 1}).to_string(),
            json!({"result": 2}).to_string(),
        ])
        .await
        .unwrap();
    for (e, want) in batch.iter().zip([1, 2]) {
        let st = p.wait(&e.id, Duration::from_secs(15)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded);
        assert_eq!(st.result.unwrap()["result"], want);
    }

    // Operator suspension through the node record; the worker obeys it and reports it.
    assert!(
        nodes::suspend(&broker_redis, "gpu-1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let suspended = |want: bool| {
        let s = &s;
        async move {
            let until: Option<String> = redis::cmd("HGET")
                .arg(QueueKeys::new(QUEUE).unwrap().suspended())
                .arg("gpu-1")
                .query_async(&mut s.admin.conn())
                .await
                .unwrap();
            until.is_some() == want
        }
    };
    eventually(Duration::from_secs(5), "gpu-1 suspended", || {
        suspended(true)
    })
    .await;
    assert!(nodes::resume(&broker_redis, "gpu-1").await.unwrap());
    eventually(Duration::from_secs(5), "gpu-1 resumed", || suspended(false)).await;

    // A dead letter, retried and purged by the broker.
    let doomed = p
        .enqueue(
            &json!({"fail": "retry"}),
            &EnqueueOptions {
                max_attempts: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let st = p.wait(&doomed.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Dead, "{st:?}");
    let dead = inspect::dead_letters(&broker_redis, &keys, "-", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].job, doomed.id);
    let again = inspect::retry_dead(&broker_redis, &keys, &dead[0].dead_id)
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some(doomed.id.as_str()));
    eventually(
        Duration::from_secs(15),
        "the retried job dead again",
        || async {
            let now = inspect::dead_letters(&broker_redis, &keys, "-", 10)
                .await
                .unwrap();
            now.len() == 1 && now[0].dead_id != dead[0].dead_id && now[0].job == doomed.id
        },
    )
    .await;
    assert_eq!(
        inspect::purge_dead(&broker_redis, &keys, &[])
            .await
            .unwrap(),
        1
    );

    // Metrics, readiness and the fleet, read under the broker's user.
    let metrics = reqwest::get(format!("{}/metrics", broker.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "fleetq_queue_dead{queue=\"a\"}",
        "fleetq_queue_waiting{queue=\"a\"}",
        "fleetq_node_slots{node=\"gpu-1\"} 1",
    ] {
        assert!(metrics.contains(want), "no {want} in\n{metrics}");
    }
    let ready = reqwest::get(format!("{}/readyz", broker.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    let fleet = nodes::list(&broker_redis).await.unwrap();
    assert!(fleet.iter().any(|n| n.node == "gpu-1"), "{fleet:?}");

    // Nothing any role did was refused, not even inside a function.
    assert_eq!(s.acl_log().await, Vec::<String>::new());

    // A clean stop: the worker removes its consumer and its own record.
    let mut w1 = w1;
    w1.signal(libc::SIGTERM);
    assert_eq!(
        w1.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        w1.log()
    );
    assert_eq!(s.node_field("gpu-1", "last_seen_ms").await, None);
    broker.stop().await;
    assert_eq!(s.acl_log().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_work_under_their_own_users_on_redis() {
    roles_work_under_their_own_users(Flavor::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_work_under_their_own_users_on_valkey() {
    if let Some(f) = Flavor::valkey() {
        roles_work_under_their_own_users(f).await;
    }
}

/// A queue split in partitions, worked under the role users: the producer writes to the
/// partitions, the worker reads them all (and waits on them with `XREAD`), the broker copies
/// the config to them, and nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_queue_runs_under_the_role_users() {
    let s = Server::start(Flavor::redis()).await;
    let keys = QueueKeys::new(QUEUE).unwrap();
    fleetq_broker::partitions::set(&s.admin, &keys, 3)
        .await
        .unwrap();
    let broker_url = s.user("fleetq-broker", QUEUE, "").await;
    let producer_url = s.user("fleetq-producer", QUEUE, "").await;
    let worker_url = s.user("fleetq-worker-NODE", QUEUE, "gpu-1").await;
    let broker = Broker::start(Redis::connect(&broker_url).await.unwrap()).await;
    eventually(Duration::from_secs(10), "the library", || async {
        s.library().await == LibraryState::Current(functions::library_version())
    })
    .await;
    let _worker = WorkerProcess::spawn(&worker_url, QUEUE, "gpu-1", 2, &[]);
    // A config change on the queue reaches its partitions through the broker.
    let _: () = redis::cmd("HSET")
        .arg(keys.config())
        .arg("max_attempts")
        .arg(7)
        .query_async(&mut s.admin.conn())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the config copied", || async {
        let v: Option<String> = redis::cmd("HGET")
            .arg(keys.partition(1).config())
            .arg("max_attempts")
            .query_async(&mut s.admin.conn())
            .await
            .unwrap();
        v.as_deref() == Some("7")
    })
    .await;
    let p = Producer::new(&Redis::connect(&producer_url).await.unwrap(), QUEUE)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..9 {
        let e = p
            .enqueue(&json!({ "result": n }), &EnqueueOptions::default())
            .await
            .unwrap();
        ids.push(e.id);
    }
    for id in &ids {
        let st = p.wait(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    }
    for i in 0..3 {
        let added: u64 = redis::cmd("XLEN")
            .arg(keys.partition(i).stream())
            .query_async(&mut s.admin.conn())
            .await
            .unwrap();
        // Entries are dropped once finished: each partition had its share and is empty now.
        assert_eq!(added, 0, "partition {i}");
    }
    broker.stop().await;
    assert_eq!(s.acl_log().await, Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// What each role is refused.

async fn roles_are_refused_what_they_do_not_need(flavor: Flavor) {
    let s = Server::start(flavor).await;
    let broker = Redis::connect(&s.user("fleetq-broker", QUEUE, "").await)
        .await
        .unwrap();
    let producer = Redis::connect(&s.user("fleetq-producer", QUEUE, "").await)
        .await
        .unwrap();
    let worker = Redis::connect(&s.user("fleetq-worker-NODE", QUEUE, "gpu-1").await)
        .await
        .unwrap();
    functions::load(&mut broker.conn()).await.unwrap();
    let source = functions::library_source();
    let other = QueueKeys::new(OTHER_QUEUE).unwrap();
    let other_stream = other.stream();
    let other_config = other.config();
    let own_stream = QueueKeys::new(QUEUE).unwrap().stream();

    // The worker: no library loading, no other queue, no other node's record, nothing
    // outside fleetq, no server administration.
    refused(
        "worker FUNCTION LOAD",
        raw(&worker, &["FUNCTION", "LOAD", "REPLACE", &source]).await,
    );
    functions::load(&mut worker.conn())
        .await
        .expect("the library is current: nothing to load, nothing refused");
    let own_beat = "FCALL fleetq_node_beat 1 fleetq:node:gpu-1 30000 node gpu-1";
    assert!(line(&worker, own_beat).await.is_ok(), "its own record");
    refuse_all(
        &worker,
        &[
            "FUNCTION DELETE fleetq",
            "FUNCTION FLUSH",
            &format!("FCALL fleetq_status 1 {other_stream} x"),
            &format!("XADD {other_stream} * payload {{}}"),
            &format!("XREADGROUP GROUP workers c STREAMS {other_stream} >"),
            "FCALL fleetq_node_beat 1 fleetq:node:gpu-2 30000 node gpu-2",
            "HSET fleetq:node:gpu-2 command resume",
            "DEL fleetq:node:gpu-2",
            "HSET elsewhere f v",
            "CLIENT LIST",
            "CONFIG GET maxmemory",
            "KEYS *",
        ],
    )
    .await;

    // The producer: its queue only, and no worker's or administrator's work.
    refused(
        "producer FUNCTION LOAD",
        raw(&producer, &["FUNCTION", "LOAD", "REPLACE", &source]).await,
    );
    // A producer reads its queue's partition count when made: refused for another queue.
    match Producer::new(&producer, OTHER_QUEUE).await {
        Err(Error::Redis { source, .. }) if source.code() == Some("NOPERM") => {}
        other => panic!("producer for another queue: expected NOPERM, got {other:?}"),
    }
    let p = Producer::new(&producer, QUEUE).await.unwrap();
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(e.created);
    refuse_all(
        &producer,
        &[
            &format!("XREADGROUP GROUP workers c STREAMS {own_stream} >"),
            "HSET fleetq:node:gpu-1 command resume",
            "FCALL fleetq_node_beat 1 fleetq:node:gpu-1 30000",
            "CLIENT LIST",
        ],
    )
    .await;

    // The broker: every fleetq key, but nothing else and no server administration.
    refuse_all(
        &broker,
        &[
            "HSET elsewhere f v",
            "CONFIG SET maxmemory 1",
            "FLUSHALL",
            "FUNCTION DELETE fleetq",
        ],
    )
    .await;

    // A producer for every queue (`*` for QUEUE) reaches both queues, but no node record.
    let all = s
        .user_named("fleetq-producer-all", "fleetq-producer", "*", "")
        .await;
    let all = Redis::connect(&all).await.unwrap();
    for q in [QUEUE, OTHER_QUEUE] {
        let p = Producer::new(&all, q).await.unwrap();
        let e = p.enqueue(&json!({}), &EnqueueOptions::default()).await;
        assert!(e.unwrap().created);
    }
    refuse_all(&all, &["HSET fleetq:node:gpu-1 f v"]).await;

    // The refusals are in the ACL log, each under the user that was refused.
    let log = s.acl_log().await;
    for (user, object) in [
        ("fleetq-worker-gpu-1", "function|load"),
        ("fleetq-worker-gpu-1", "fleetq:node:gpu-2"),
        ("fleetq-worker-gpu-1", other_stream.as_str()),
        ("fleetq-producer", "function|load"),
        ("fleetq-producer", "xreadgroup"),
        // The partition count, the first thing a producer of another queue reads.
        ("fleetq-producer", other_config.as_str()),
        ("fleetq-broker", "flushall"),
        ("fleetq-producer-all", "fleetq:node:gpu-1"),
    ] {
        assert!(
            log.iter()
                .any(|l| l.starts_with(&format!("{user}: {object} "))),
            "no refusal of {object} for {user} in the ACL log:\n{log:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_refused_what_they_do_not_need_on_redis() {
    roles_are_refused_what_they_do_not_need(Flavor::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_refused_what_they_do_not_need_on_valkey() {
    if let Some(f) = Flavor::valkey() {
        roles_are_refused_what_they_do_not_need(f).await;
    }
}

// ---------------------------------------------------------------------------------------
// A worker before the library.

/// How many `FCALL_RO` calls the server has run (the worker's checks of the library).
async fn fcall_ro_calls(s: &Server) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut s.admin.conn())
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall_ro:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn a_worker_waits_for_the_library(flavor: Flavor) {
    let s = Server::start(flavor).await;
    let broker_url = s.user("fleetq-broker", QUEUE, "").await;
    let producer_url = s.user("fleetq-producer", QUEUE, "").await;
    let worker_url = s.user("fleetq-worker-NODE", QUEUE, "gpu-1").await;
    let producer = Redis::connect(&producer_url).await.unwrap();
    let keys = QueueKeys::new(QUEUE).unwrap();

    // A producer cannot load it and says what to do.
    match Producer::new(&producer, QUEUE).await {
        Err(Error::Library(msg)) => assert!(
            msg.contains("not loaded") && msg.contains("`fleetq functions load`"),
            "{msg}"
        ),
        other => panic!("expected a missing-library error, got {other:?}"),
    }

    // The real worker binary, under its user: it waits and says why, once.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker: Child = Command::new(bin_path("fleetq-worker"))
        .args(["--queue", QUEUE, "--node", "gpu-1", "--executor", "echo"])
        .args(["--metrics-addr", "off"])
        .env("REDIS_URL", &worker_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let missing = "the fleetq function library is not loaded on this Redis";
    eventually(
        Duration::from_secs(15),
        "the worker says the library is missing",
        || {
            let l = read_log();
            async move { l.contains(missing) }
        },
    )
    .await;
    let before = fcall_ro_calls(&s).await;
    eventually(
        Duration::from_secs(10),
        "the worker looking again and again",
        || async { fcall_ro_calls(&s).await >= before + 5 },
    )
    .await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "exited:\n{}",
        read_log()
    );
    assert_eq!(read_log().matches(missing).count(), 1, "{}", read_log());
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.stream())
        .query_async(&mut s.admin.conn())
        .await
        .unwrap();
    assert!(
        !exists,
        "the worker went on without the library:\n{}",
        read_log()
    );

    // An older library is not enough either; the worker says so (once more: a new state).
    let old = functions::library_source().replace(&functions::library_version(), "1.0.0+old");
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(old)
        .query_async(&mut s.admin.conn())
        .await
        .unwrap();
    let older = "older than this build's (1.0.0+old <";
    eventually(
        Duration::from_secs(10),
        "the worker says the library is older",
        || {
            let l = read_log();
            async move { l.contains(older) }
        },
    )
    .await;
    match Producer::new(&producer, QUEUE).await {
        Err(Error::Library(msg)) => assert!(msg.contains(older), "{msg}"),
        other => panic!("expected an older-library error, got {other:?}"),
    }
    let status = cli(&broker_url, &["functions", "status"]);
    assert_eq!(status.status.code(), Some(4), "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("1.0.0+old"),
        "{}",
        text(&status)
    );
    // The only refusals so far: the producer trying to load it. The worker never tried.
    let producer_tried = "fleetq-producer: function|load (command, toplevel)".to_owned();
    assert_eq!(s.acl_log().await, vec![producer_tried.clone()]);

    // The worker's user may not load it; the broker's may.
    let refused_load = cli(&worker_url, &["functions", "load"]);
    assert_eq!(
        refused_load.status.code(),
        Some(4),
        "{}",
        text(&refused_load)
    );
    assert!(
        String::from_utf8_lossy(&refused_load.stderr).contains("may not load it"),
        "{}",
        text(&refused_load)
    );
    let load = cli(&broker_url, &["functions", "load"]);
    assert!(load.status.success(), "{}", text(&load));
    assert!(
        String::from_utf8_lossy(&load.stdout).contains("loaded fleetq library"),
        "{}",
        text(&load)
    );
    let status = cli(&broker_url, &["--json", "functions", "status"]);
    assert!(status.status.success(), "{}", text(&status));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "current", "{v}");
    assert_eq!(v["server"], functions::library_version());
    assert_eq!(v["usable"], true);

    // The worker goes on by itself and runs a job.
    eventually(
        Duration::from_secs(10),
        "the worker sees the library",
        || {
            let l = read_log();
            async move { l.contains("library is loaded now") }
        },
    )
    .await;
    let p = Producer::new(&producer, QUEUE).await.unwrap();
    let e = p
        .enqueue(&json!({"x": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{}", read_log());
    assert_eq!(st.result.unwrap()["node"], "gpu-1");

    send_signal(worker.id(), libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0), "{}", read_log());
    // Besides the producer's tries, the only refusal: the worker's user trying
    // `fleetq functions load` (the log lists the newest first).
    assert_eq!(
        s.acl_log().await,
        vec![
            "fleetq-worker-gpu-1: function|load (command, toplevel)".to_owned(),
            producer_tried
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_the_library_until_the_broker_loads_it_on_redis() {
    a_worker_waits_for_the_library(Flavor::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_the_library_until_the_broker_loads_it_on_valkey() {
    if let Some(f) = Flavor::valkey() {
        a_worker_waits_for_the_library(f).await;
    }
}

/// `check` tells a missing, older, current and newer library apart, and `load` replaces only
/// a missing or older one.
#[tokio::test]
async fn check_tells_the_servers_library_apart() {
    let s = Server::start(Flavor::redis()).await;
    let mut c = s.admin.conn();
    assert_eq!(
        functions::check(&mut c).await.unwrap(),
        LibraryState::Missing
    );
    let replace = |version: &str| {
        let src = functions::library_source().replace(&functions::library_version(), version);
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(src);
        cmd
    };
    let _: String = replace("1.9.9+old").query_async(&mut c).await.unwrap();
    let older = functions::check(&mut c).await.unwrap();
    assert_eq!(older, LibraryState::Older("1.9.9+old".into()));
    assert!(!older.usable() && older.problem().unwrap().contains("1.9.9+old <"));
    functions::load(&mut c).await.unwrap();
    assert_eq!(
        functions::check(&mut c).await.unwrap(),
        LibraryState::Current(functions::library_version())
    );
    let same_semver = format!("{}+0ther", functions::LIBRARY_SEMVER);
    let _: String = replace(&same_semver).query_async(&mut c).await.unwrap();
    functions::load(&mut c).await.unwrap();
    assert_eq!(
        functions::check(&mut c).await.unwrap(),
        LibraryState::Current(same_semver),
        "another build of the same version is left in place"
    );
    let _: String = replace("99.0.0+new").query_async(&mut c).await.unwrap();
    functions::load(&mut c).await.unwrap();
    let newer = functions::check(&mut c).await.unwrap();
    assert_eq!(newer, LibraryState::Newer("99.0.0+new".into()));
    assert!(newer.usable() && newer.problem().is_none());
}

/// What the guide adds to every role's line on a Redis Cluster.
const CLUSTER_RULES: &str = "+cluster|slots +cluster|info +asking";

/// On a Redis Cluster, each role runs under its user (created on every node, as ACLs are
/// per node) with the guide's cluster additions, and nothing is refused on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_work_under_their_own_users_on_a_cluster() {
    assert!(
        GUIDE.contains(CLUSTER_RULES),
        "docs/operations.md no longer names {CLUSTER_RULES} for a cluster"
    );
    let cluster = fleetq_tests::cluster::RedisCluster::start().await;
    let seeds = cluster.seed_url();
    let hosts = seeds.trim_start_matches("redis+cluster://").to_owned();
    let mut urls = HashMap::new();
    for (template, node) in [
        ("fleetq-broker", ""),
        ("fleetq-producer", ""),
        ("fleetq-worker-NODE", "gpu-1"),
    ] {
        let mut rules = rules_for(template, QUEUE, node);
        rules.extend(CLUSTER_RULES.split(' ').map(str::to_owned));
        for port in cluster.ports() {
            let mut c = direct_connection(&cluster.node_url(port)).await;
            let ok: String = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&rules)
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("node {port} refused {rules:?}: {e}"));
            assert_eq!(ok, "OK");
        }
        let user = rules[0].clone();
        urls.insert(
            template,
            format!("redis+cluster://{user}:{PASSWORD}@{hosts}"),
        );
    }
    let broker = Broker::start(Redis::connect(&urls["fleetq-broker"]).await.unwrap()).await;
    let admin = Redis::connect(&seeds).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "the broker loaded the library on every primary",
        || async { functions::check_all(&admin.conn()).await.unwrap().usable() },
    )
    .await;
    let p = Producer::new(
        &Redis::connect(&urls["fleetq-producer"]).await.unwrap(),
        QUEUE,
    )
    .await
    .unwrap();
    let _w = WorkerProcess::spawn(&urls["fleetq-worker-NODE"], QUEUE, "gpu-1", 2, &[]);
    for n in 0..5 {
        let e = p
            .enqueue(&json!({ "result": n }), &EnqueueOptions::default())
            .await
            .unwrap();
        let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    }
    let ready = reqwest::get(format!("{}/readyz", broker.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    broker.stop().await;
    for port in cluster.ports() {
        let mut c = direct_connection(&cluster.node_url(port)).await;
        let log: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
            .arg("LOG")
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        let refused: Vec<String> = log
            .iter()
            .map(|e| {
                ["username", "object", "reason"]
                    .map(|k| {
                        e.get(k)
                            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                            .unwrap_or_default()
                    })
                    .join(" ")
            })
            .filter(|t| !t.contains("client|setinfo"))
            .collect();
        assert_eq!(refused, Vec::<String>::new(), "node {port}");
    }
}
