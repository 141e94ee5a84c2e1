//! The broker's HTTP API under abuse, against real `fleetq-broker` processes: no open API on
//! a network by accident, no CSRF by simple requests, slow or idle clients cut, a cap on
//! connections, every refusal a JSON 4xx, memory that does not grow with queue names, and
//! schemathesis finding nothing against the OpenAPI document.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetq_broker::QueueKeys;
use fleetq_tests::{bin_path, eventually, free_port, Stack};
use serde_json::{json, Value};

const TOKEN: &str = "hardening-test-token-0123456789";

/// A `fleetq-broker` process with its log in a file, killed on drop (its log printed when
/// the test failed).
struct Broker {
    child: Child,
    log: tempfile::NamedTempFile,
    port: u16,
}

impl Broker {
    /// Starts the broker on `listen_ip:<free port>` with `args`, not waiting for it.
    fn spawn(redis_url: &str, listen_ip: &str, args: &[&str]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let port = free_port();
        let child = Command::new(bin_path("fleetq-broker"))
            .args(["--listen", &format!("{listen_ip}:{port}")])
            .args(args)
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "info")
            .env_remove("FLEETQ_API_TOKEN")
            .env_remove("FLEETQ_OPEN_API")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Self { child, log, port }
    }

    /// Starts the broker on loopback with `args` and waits until it is ready.
    async fn start(s: &Stack, args: &[&str]) -> Self {
        let b = Self::spawn(&s.server.url(), "127.0.0.1", args);
        b.ready().await;
        b
    }

    async fn ready(&self) {
        let url = format!("{}/readyz", self.base());
        eventually(Duration::from_secs(30), "the broker is ready", || async {
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The broker's resident memory, kB (`VmRSS` of /proc/<pid>/status).
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for the process to exit by itself; its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- fleetq-broker's log ---\n{}", self.log());
        }
    }
}

/// A raw client connection with a read timeout, for what HTTP clients would not send.
fn raw(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    c
}

/// What a raw read saw.
#[derive(Debug, PartialEq)]
enum Read_ {
    /// Bytes arrived.
    Data(String),
    /// Nothing within the read timeout.
    Nothing,
    /// The server closed the connection (end of file or reset).
    Closed,
}

fn read_some(c: &mut TcpStream) -> Read_ {
    let mut buf = [0u8; 8192];
    match c.read(&mut buf) {
        Ok(0) => Read_::Closed,
        Ok(n) => Read_::Data(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Read_::Nothing
        }
        Err(_) => Read_::Closed,
    }
}

/// Reads until the server closes the connection, at most `within`; the bytes read, or a
/// panic naming `what` when the connection is still open then.
fn until_closed(c: &mut TcpStream, within: Duration, what: &str) -> String {
    let deadline = Instant::now() + within;
    let mut got = String::new();
    loop {
        match read_some(c) {
            Read_::Closed => return got,
            Read_::Data(d) => got.push_str(&d),
            Read_::Nothing => {}
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the connection is still open after {within:?}; read so far: {got:?}"
        );
    }
}

/// Reads one whole small answer (headers and a Content-Length body).
fn read_answer(c: &mut TcpStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut got = String::new();
    loop {
        if let Some((head, body)) = got.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return got;
            }
        }
        match read_some(c) {
            Read_::Data(d) => got.push_str(&d),
            Read_::Closed => panic!("the connection closed before a whole answer: {got:?}"),
            Read_::Nothing => {}
        }
        assert!(
            Instant::now() < deadline,
            "no whole answer within {within:?}: {got:?}"
        );
    }
}

async fn stream_len(s: &Stack, queue: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(QueueKeys::new(queue).unwrap().stream())
        .query_async(&mut s.conn())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_beyond_loopback_wants_a_token_or_says_it_is_open() {
    let s = Stack::start().await;
    let url = s.server.url();

    let mut refused = Broker::spawn(&url, "0.0.0.0", &[]);
    assert_ne!(refused.exit_code().await, Some(0));
    let log = refused.log();
    assert!(
        log.contains("not loopback")
            && log.contains("FLEETQ_API_TOKEN")
            && log.contains("--open-api"),
        "the refusal should give the reason and the ways out: {log}"
    );

    let open = Broker::spawn(&url, "0.0.0.0", &["--open-api"]);
    open.ready().await;
    assert!(open.log().contains("THE API IS OPEN"), "{}", open.log());
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/v1/queues", open.base()))
        .header("host", "broker.example.net")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an open API serves any name");
    drop(open);

    let guarded = Broker::spawn(&url, "0.0.0.0", &["--api-token", TOKEN]);
    guarded.ready().await;
    let r = http
        .get(format!("{}/v1/queues", guarded.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/v1/queues", guarded.base()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(guarded);

    // Loopback without a token: only loopback names, so that a web page that rebinds its
    // own name to 127.0.0.1 gets nothing.
    let local = Broker::start(&s, &[]).await;
    for (host, want) in [
        ("127.0.0.1", 200),
        ("localhost:8080", 200),
        ("[::1]:8080", 200),
        ("evil.example.com", 403),
        ("evil.example.com:8080", 403),
    ] {
        let r = http
            .get(format!("{}/v1/queues", local.base()))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "Host: {host}");
        if want == 403 {
            let e: Value = r.json().await.unwrap();
            assert!(
                e["error"].as_str().unwrap().contains("FLEETQ_API_TOKEN"),
                "{e}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_cut() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &["--http-header-timeout-ms", "500"]).await;

    // Half a request line, then nothing more: cut, not held.
    let mut slow = raw(&b.addr());
    slow.write_all(b"GET /healthz HT").unwrap();
    until_closed(&mut slow, Duration::from_secs(20), "half a request line");

    // Headers that never end.
    let mut trickle = raw(&b.addr());
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n")
        .unwrap();
    until_closed(
        &mut trickle,
        Duration::from_secs(20),
        "headers that never end",
    );

    // A connection opened and never used.
    let mut silent = raw(&b.addr());
    until_closed(&mut silent, Duration::from_secs(20), "a silent connection");

    // A keep-alive connection left idle after its answer.
    let mut idle = raw(&b.addr());
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut idle, Duration::from_secs(20));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    until_closed(
        &mut idle,
        Duration::from_secs(20),
        "an idle keep-alive connection",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_length_is_cut_and_nothing_is_queued() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &["--http-body-timeout-ms", "500"]).await;
    let mut c = raw(&b.addr());
    c.write_all(
        b"POST /v1/queues/short/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"payload\":",
    )
    .unwrap();
    let got = until_closed(
        &mut c,
        Duration::from_secs(20),
        "a body shorter than its length",
    );
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("did not arrive within 500 ms"), "{got}");
    assert_eq!(stream_len(&s, "short").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_and_frees_up() {
    let s = Stack::start().await;
    let b = Broker::start(
        &s,
        &[
            "--http-max-connections",
            "3",
            "--http-header-timeout-ms",
            "120000",
        ],
    )
    .await;
    // The readiness probes' connections may still be closing: wait until three fresh
    // connections are each served.
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = raw(&b.addr());
        c.write_all(request).unwrap();
        assert!(read_answer(&mut c, Duration::from_secs(30)).starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    // A fourth waits in the backlog: it gets no answer while the three stay open.
    let mut fourth = raw(&b.addr());
    fourth.write_all(request).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        assert_eq!(
            read_some(&mut fourth),
            Read_::Nothing,
            "a fourth connection was served"
        );
    }
    assert!(b.log().contains("connection cap is reached"), "{}", b.log());
    // One closes: the fourth is served.
    drop(held.remove(0));
    let answer = read_answer(&mut fourth, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_is_not_json_is_refused_and_nothing_is_queued() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &[]).await;
    let http = reqwest::Client::new();
    let jobs = format!("{}/v1/queues/csrf/jobs", b.base());
    // What a web page may send to any address without asking first.
    for content_type in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut rb = http
            .post(&jobs)
            .body(r#"{"payload": {"from": "a web page"}}"#);
        if let Some(t) = content_type {
            rb = rb.header("content-type", t);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
        let e: Value = r.json().await.unwrap();
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("Content-Type: application/json"),
            "{e}"
        );
    }
    let r = http
        .post(format!("{}/v1/queues/csrf/dead/1-0/retry", b.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        415,
        "a retry without a body wants the JSON type too"
    );
    assert_eq!(
        stream_len(&s, "csrf").await,
        0,
        "a refused request queued a job"
    );

    let r = http
        .post(&jobs)
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"payload": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(stream_len(&s, "csrf").await, 1);
    let r = http
        .post(format!("{}/v1/queues/csrf/dead/1-0/retry", b.base()))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "an empty JSON-typed body is fine for a retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_json_4xx_that_names_the_problem() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &["--api-token", TOKEN, "--max-body-bytes", "4096"]).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", b.base());
    let json_post = |p: &str, body: String| {
        http.post(url(p))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
    };
    let long_id = "x".repeat(201);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no token",
            http.get(url("/v1/queues")),
            401,
            "missing bearer token",
        ),
        (
            "wrong token",
            http.get(url("/v1/queues")).bearer_auth("nope"),
            401,
            "wrong bearer token",
        ),
        (
            "bad queue name",
            http.get(url("/v1/queues/a:b/jobs/1")).bearer_auth(TOKEN),
            400,
            "invalid queue name",
        ),
        (
            "long queue name",
            http.get(url(&format!("/v1/queues/{}/dead", "q".repeat(101))))
                .bearer_auth(TOKEN),
            400,
            "1 to 100",
        ),
        (
            "long job id",
            http.get(url(&format!("/v1/queues/q/jobs/{long_id}")))
                .bearer_auth(TOKEN),
            400,
            "invalid job id",
        ),
        (
            "job id with a control character",
            http.delete(url("/v1/queues/q/jobs/a%01b"))
                .bearer_auth(TOKEN),
            400,
            "printable ASCII",
        ),
        (
            "bad dead id",
            http.delete(url("/v1/queues/q/dead/x-1")).bearer_auth(TOKEN),
            400,
            "<ms>-<seq>",
        ),
        (
            "dead id past 64 bits",
            json_post(
                "/v1/queues/q/dead/99999999999999999999-0/retry",
                String::new(),
            ),
            400,
            "<ms>-<seq>",
        ),
        (
            "bad start",
            http.get(url("/v1/queues/q/dead?start=abc"))
                .bearer_auth(TOKEN),
            400,
            "<ms>-<seq>",
        ),
        (
            "count 0",
            http.get(url("/v1/queues/q/dead?count=0"))
                .bearer_auth(TOKEN),
            400,
            "use 1 to 1000",
        ),
        (
            "count too large",
            http.get(url("/v1/queues/q/dead?count=1001"))
                .bearer_auth(TOKEN),
            400,
            "use 1 to 1000",
        ),
        (
            "count not a number",
            http.get(url("/v1/queues/q/dead?count=ten"))
                .bearer_auth(TOKEN),
            400,
            "count",
        ),
        (
            "count a fraction",
            http.get(url("/v1/queues/q/dead?count=1.5"))
                .bearer_auth(TOKEN),
            400,
            "count",
        ),
        (
            "negative timeout",
            http.get(url("/v1/queues/q/jobs/1/wait?timeout_ms=-1"))
                .bearer_auth(TOKEN),
            400,
            "timeout_ms",
        ),
        (
            "timeout too long",
            http.get(url("/v1/queues/q/jobs/1/wait?timeout_ms=300001"))
                .bearer_auth(TOKEN),
            400,
            "use 0 to 300000",
        ),
        (
            "no such job",
            http.get(url("/v1/queues/q/jobs/nope")).bearer_auth(TOKEN),
            404,
            "no job nope",
        ),
        (
            "no such path",
            http.get(url("/v2/anything")),
            404,
            "no such path",
        ),
        (
            "no such method",
            http.put(url("/v1/queues/q/jobs")).bearer_auth(TOKEN),
            405,
            "Allow header",
        ),
        (
            "not JSON",
            json_post("/v1/queues/q/jobs", "{\"payload\": {".into()),
            400,
            "not valid JSON",
        ),
        (
            "not an object",
            json_post("/v1/queues/q/jobs", "[1]".into()),
            400,
            "expected fields",
        ),
        (
            "no payload",
            json_post("/v1/queues/q/jobs", "{}".into()),
            400,
            "payload",
        ),
        (
            "unknown field",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "colour": "red"}).to_string(),
            ),
            400,
            "colour",
        ),
        (
            "fractional timeout",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "run_timeout_ms": 1.5}).to_string(),
            ),
            400,
            "whole number",
        ),
        (
            "negative attempts",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "max_attempts": -1}).to_string(),
            ),
            400,
            "whole number",
        ),
        (
            "zero attempts",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "max_attempts": 0}).to_string(),
            ),
            400,
            "max_attempts",
        ),
        (
            "attempts too many",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "max_attempts": 1_000_001}).to_string(),
            ),
            400,
            "max_attempts",
        ),
        (
            "timeout too large",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "run_timeout_ms": fleetq_broker::limits::MAX_MS + 1})
                    .to_string(),
            ),
            400,
            "run_timeout_ms",
        ),
        (
            "empty id",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "id": ""}).to_string(),
            ),
            400,
            "invalid id",
        ),
        (
            "id not ASCII",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": 1, "id": "é"}).to_string(),
            ),
            400,
            "printable ASCII",
        ),
        (
            "body too large",
            json_post(
                "/v1/queues/q/jobs",
                json!({"payload": "x".repeat(5000)}).to_string(),
            ),
            413,
            "size limit",
        ),
        (
            "retry with a body",
            json_post(
                "/v1/queues/q/dead/1-0/retry",
                json!({"now": true}).to_string(),
            ),
            400,
            "now",
        ),
    ];
    for (what, rb, want, says) in cases {
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let allow = r.headers().get("allow").is_some();
        let kind = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = r.text().await.unwrap();
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(kind.as_deref(), Some("application/json"), "{what}: {body}");
        let e: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        let msg = e["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error: {body}"));
        assert!(
            msg.contains(says),
            "{what}: {msg:?} should mention {says:?}"
        );
        if want == 405 {
            assert!(allow, "{what}: a 405 names the allowed methods");
        }
    }
    // Whole numbers spelled as floats are whole numbers.
    let r = json_post(
        "/v1/queues/q/jobs",
        json!({"payload": 1, "max_attempts": 3.0}).to_string(),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        stream_len(&s, "q").await,
        1,
        "only the one valid job was queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_states_the_rules() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &["--api-token", TOKEN]).await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", b.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let codes: Vec<&str> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            if !path.starts_with("/v1") {
                continue;
            }
            operations += 1;
            assert_eq!(op["security"], json!([{"bearer": []}]), "{method} {path}");
            for code in ["400", "401", "403", "503"] {
                assert!(
                    codes.contains(&code),
                    "{method} {path} does not document {code}: {codes:?}"
                );
            }
            if method == "post" {
                for code in ["408", "413", "415"] {
                    assert!(
                        codes.contains(&code),
                        "{method} {path} does not document {code}"
                    );
                }
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                let schema = &p["schema"];
                if p["in"] == "path" {
                    assert!(
                        schema["pattern"].is_string() && schema["maxLength"].is_u64(),
                        "{method} {path}: {p}"
                    );
                }
                if schema["type"] == "integer" {
                    assert!(
                        schema["minimum"].is_u64() && schema["maximum"].is_u64(),
                        "{method} {path}: {p}"
                    );
                }
            }
        }
    }
    assert_eq!(operations, 9);
    let wait = &doc["paths"]["/v1/queues/{queue}/jobs/{id}/wait"]["get"];
    assert!(wait["responses"]["408"].is_object());
    let queue = &doc["paths"]["/v1/queues/{queue}/jobs"]["post"]["parameters"][0]["schema"];
    assert_eq!(queue["pattern"], "^[A-Za-z0-9._-]{1,100}$");
    assert_eq!(queue["maxLength"], fleetq_broker::keys::MAX_QUEUE_NAME_LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_queue_names_leave_memory_flat() {
    let s = Stack::start().await;
    let b = Broker::start(&s, &[]).await;
    let http = reqwest::Client::new();
    // Four keep-alive clients, each asking for the status of a job in ever new queues.
    let ask = |names: std::ops::Range<usize>| {
        let (http, base) = (http.clone(), b.base());
        async move {
            let mut tasks = Vec::new();
            for lane in 0..4 {
                let (http, base, names) = (http.clone(), base.clone(), names.clone());
                tasks.push(tokio::spawn(async move {
                    for i in names.skip(lane).step_by(4) {
                        let r = http
                            .get(format!("{base}/v1/queues/name-{i}/jobs/x"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 404);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    // Warm up past the producer cache's size, so that it is full and churning.
    ask(0..2_000).await;
    let before = b.rss_kb();
    ask(2_000..22_000).await;
    let after = b.rss_kb();
    let grown = after.saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "20 000 queue names grew the broker from {before} kB to {after} kB"
    );
}

/// The schemathesis settings of the run below, with the reason for each.
const SCHEMATHESIS_CONFIG: &str = r#"
[[operations]]
include-name = "GET /v1/queues/{queue}/jobs/{id}/wait"
# A wait on a job that exists blocks for timeout_ms (30 s by default): keep it short here
# (the tests above cover timeout_ms's range).
parameters = { "query.timeout_ms" = 50 }
# 408 is the documented answer of a wait that ran out before the job ended.
checks.positive_data_acceptance.expected-statuses = ["200", "401", "403", "404", "408"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_the_openapi_document() {
    let found = Command::new("schemathesis").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: run `python3 -m pip install schemathesis==4.32.5` \
         (add --break-system-packages on a system Python), as `./dev test` does"
    );
    let s = Stack::start().await;
    let b = Broker::start(&s, &["--api-token", TOKEN]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_CONFIG).unwrap();
    let mut run = tokio::process::Command::new("schemathesis");
    run.arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", b.base()))
        // Every check but one: DELETE …/jobs/{id} cancels a job, and its record (state
        // "cancelled") stays readable until the queue's retention ends, by design, where
        // use_after_free expects a 404.
        .args(["--checks", "all", "--exclude-checks", "use_after_free"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--max-examples", "15", "--workers", "1", "--seed", "1"])
        .args(["--request-timeout", "10"])
        // Its example database and crash files go to the temporary directory.
        .current_dir(dir.path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), run.output())
        .await
        .expect("schemathesis did not finish within 180 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(
        text.contains("Tested: 11"),
        "not every operation was tested:\n{text}"
    );
}
