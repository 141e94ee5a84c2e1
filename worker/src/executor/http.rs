//! The HTTP executor: jobs run on a local inference server.
//!
//! - [`HttpMode::Json`]: `POST <url>` with the payload as JSON; a 2xx answer's body is the
//!   result, a 4xx fails the job for good, a 5xx or a lost connection retries it.
//! - [`HttpMode::ComfyUi`]: the ComfyUI API. The worker opens the websocket
//!   (`/ws?clientId=…`), submits the workflow (`POST /prompt`; the payload's `prompt` object, or
//!   the payload itself), and follows the events of its prompt: `execution_start` → started,
//!   `executing` (node) and `progress` (value/max) → stage and step, `execution_success` (or
//!   `executing` with no node) → done, when the outputs are fetched from `/history/{id}`;
//!   `execution_error` and `execution_interrupted` fail the attempt. When a timeout or a
//!   cancel stops the job, `POST /interrupt` stops the server's work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::handler::{Handler, Job, JobContext, Outcome, Progress};

/// Default time a request (other than the websocket) may take.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which API the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// POST the payload, the answer is the result.
    Json,
    /// ComfyUI: `/prompt`, websocket events, `/history`, `/interrupt`.
    ComfyUi,
}

/// Settings of the HTTP executor.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The server: the endpoint to POST to (JSON mode) or the base URL (ComfyUI), e.g.
    /// `http://127.0.0.1:8188`. Flag `--url`, env `FLEETQ_URL`.
    pub url: String,
    /// Which API. Flag `--executor http|comfyui`.
    pub mode: HttpMode,
    /// Time a request may take (JSON mode: the whole job). Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

/// Runs jobs on a local inference server (see the module docs).
#[derive(Debug, Clone)]
pub struct HttpExecutor {
    config: HttpConfig,
    base: String,
    client: reqwest::Client,
}

impl HttpExecutor {
    /// An executor for `config`; the URL is checked for shape here and for life by `ready`.
    pub fn new(config: HttpConfig) -> Result<Self, String> {
        let base = config.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "URL {:?} must start with http:// or https://, e.g. http://127.0.0.1:8188",
                config.url
            ));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            config,
            base,
            client,
        })
    }

    async fn run_json(&self, job: Job) -> Outcome {
        let r = self.client.post(&self.base).json(&job.payload).send().await;
        let resp = match r {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(format!("cannot reach {}: {e}", self.base)),
        };
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            Outcome::Succeeded(serde_json::from_str(&body).unwrap_or(Value::String(body)))
        } else if status.is_client_error() {
            Outcome::Fail(format!(
                "the server refused the job ({status}): {}",
                snippet(&body)
            ))
        } else {
            Outcome::Retry(format!("the server failed ({status}): {}", snippet(&body)))
        }
    }

    async fn run_comfy(&self, job: Job, ctx: JobContext) -> Outcome {
        let client_id = format!("fleetq-{:016x}", rand::random::<u64>());
        // Each step's error is already the attempt's outcome; `?`-style early returns keep
        // the happy path readable.
        let mut ws = match self.open_socket(&client_id).await {
            Ok(ws) => ws,
            Err(outcome) => return outcome,
        };
        let prompt_id = match self.submit(&job.payload, &client_id).await {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        // From here on, a stopped job interrupts the server's work: every early return below
        // drops the guard armed.
        let guard = Interrupt {
            client: self.client.clone(),
            base: self.base.clone(),
            armed: Arc::new(AtomicBool::new(true)),
        };
        if let Err(outcome) = follow(&mut ws, &prompt_id, &ctx, &guard).await {
            return outcome;
        }
        guard.disarm();
        self.outputs(&prompt_id).await
    }

    /// Opens the websocket ComfyUI reports progress on, registered as `client_id`.
    async fn open_socket(&self, client_id: &str) -> Result<Socket, Outcome> {
        let ws_url = format!(
            "{}/ws?clientId={client_id}",
            self.base.replacen("http", "ws", 1)
        );
        let mut ws = match tokio::time::timeout(
            self.config.request_timeout,
            tokio_tungstenite::connect_async(&ws_url),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                return Err(Outcome::Retry(format!(
                    "cannot open the ComfyUI websocket {ws_url}: {e}"
                )))
            }
            Err(_) => {
                return Err(Outcome::Retry(format!(
                    "the ComfyUI websocket {ws_url} did not open in time"
                )))
            }
        };
        // ComfyUI greets a new socket with a `status` message once it is registered; waiting
        // for it keeps the first events of the prompt from being sent before the socket is known.
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
        Ok(ws)
    }

    /// Submits the workflow (the payload's `prompt` object, or the payload itself) and returns
    /// ComfyUI's prompt id. A 4xx fails the job for good (the workflow is wrong); anything
    /// else that goes wrong retries it.
    async fn submit(&self, payload: &Value, client_id: &str) -> Result<String, Outcome> {
        let graph = match payload.get("prompt") {
            Some(p) if p.is_object() => p,
            _ => payload,
        };
        let resp = self
            .client
            .post(format!("{}/prompt", self.base))
            .json(&json!({ "prompt": graph, "client_id": client_id }))
            .send()
            .await
            .map_err(|e| {
                Outcome::Retry(format!("cannot submit to ComfyUI at {}: {e}", self.base))
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = format!(
                "ComfyUI refused the workflow ({status}): {}",
                snippet(&body.to_string())
            );
            return Err(if status.is_client_error() {
                Outcome::Fail(msg)
            } else {
                Outcome::Retry(msg)
            });
        }
        body.get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Outcome::Retry(format!(
                    "ComfyUI answered /prompt without a prompt_id: {}",
                    snippet(&body.to_string())
                ))
            })
    }

    /// The finished prompt's outputs from `/history/{id}`: the job's result.
    async fn outputs(&self, prompt_id: &str) -> Outcome {
        let history = self
            .client
            .get(format!("{}/history/{prompt_id}", self.base))
            .send()
            .await;
        match history {
            Ok(r) if r.status().is_success() => {
                let h: Value = r.json().await.unwrap_or(Value::Null);
                Outcome::Succeeded(
                    json!({ "prompt_id": prompt_id, "outputs": h[prompt_id]["outputs"] }),
                )
            }
            Ok(r) => Outcome::Retry(format!("ComfyUI /history answered {}", r.status())),
            Err(e) => Outcome::Retry(format!(
                "cannot read the outputs from ComfyUI /history: {e}"
            )),
        }
    }
}

/// The ComfyUI websocket.
type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one websocket event means for the job.
enum Step {
    /// Not the end: keep reading.
    Continue,
    /// The prompt finished; its outputs can be read.
    Done,
    /// ComfyUI reported the prompt failed or was interrupted: retry with this reason.
    Failed(String),
}

/// Follows the events of `prompt_id` until it finishes (`Ok`) or the attempt ends otherwise
/// (`Err` with its outcome). A ComfyUI-side failure disarms `guard`: there is nothing left
/// to interrupt.
async fn follow(
    ws: &mut Socket,
    prompt_id: &str,
    ctx: &JobContext,
    guard: &Interrupt,
) -> Result<(), Outcome> {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ctx.cancelled() => return Err(Outcome::Retry("stopped".into())),
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Close(_))) | None => {
                return Err(Outcome::Retry(
                    "the ComfyUI websocket closed during the job".into(),
                ))
            }
            Some(Ok(_)) => continue, // previews (binary), pings
            Some(Err(e)) => {
                return Err(Outcome::Retry(format!("the ComfyUI websocket failed: {e}")))
            }
        };
        match on_event(&text, prompt_id, ctx).await {
            Step::Continue => {}
            Step::Done => return Ok(()),
            Step::Failed(reason) => {
                guard.disarm();
                return Err(Outcome::Retry(reason));
            }
        }
    }
}

/// Reads one websocket text message; events of other prompts (and non-JSON text) are skipped.
async fn on_event(text: &str, prompt_id: &str, ctx: &JobContext) -> Step {
    let Ok(event) = serde_json::from_str::<Value>(text) else {
        return Step::Continue;
    };
    let data = &event["data"];
    if data.get("prompt_id").and_then(Value::as_str) != Some(prompt_id) {
        return Step::Continue;
    }
    let node = data.get("node").and_then(Value::as_str).map(str::to_owned);
    match event["type"].as_str().unwrap_or("") {
        "execution_start" => ctx.started().await,
        // `executing` with no node also ends a prompt (servers without `execution_success`).
        "executing" => match node {
            Some(n) => ctx.progress(Progress::stage(n)).await,
            None => return Step::Done,
        },
        "progress" => {
            let mut p = Progress {
                step: data["value"].as_u64(),
                total: data["max"].as_u64(),
                ..Progress::default()
            };
            p.stage = node;
            ctx.progress(p).await;
        }
        "execution_success" => return Step::Done,
        "execution_error" => {
            return Step::Failed(format!(
                "ComfyUI error in node {} ({}): {}: {}",
                data["node_id"].as_str().unwrap_or("?"),
                data["node_type"].as_str().unwrap_or("?"),
                data["exception_type"].as_str().unwrap_or("error"),
                data["exception_message"].as_str().unwrap_or("")
            ))
        }
        "execution_interrupted" => return Step::Failed("ComfyUI interrupted the prompt".into()),
        _ => {}
    }
    Step::Continue
}

/// Calls `POST /interrupt` when dropped while armed: the job was stopped mid-run.
struct Interrupt {
    client: reqwest::Client,
    base: String,
    armed: Arc<AtomicBool>,
}

impl Interrupt {
    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let (client, url) = (self.client.clone(), format!("{}/interrupt", self.base));
        tracing::info!(%url, "interrupting the server's work for a stopped job");
        tokio::spawn(async move {
            if let Err(e) = client.post(&url).send().await {
                tracing::warn!(%url, error = %e, "cannot interrupt the server");
            }
        });
    }
}

fn snippet(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

impl Handler for HttpExecutor {
    async fn handle(&self, job: Job, ctx: JobContext) -> Outcome {
        match self.config.mode {
            HttpMode::Json => self.run_json(job).await,
            HttpMode::ComfyUi => self.run_comfy(job, ctx).await,
        }
    }

    fn reports_start(&self) -> bool {
        self.config.mode == HttpMode::ComfyUi
    }

    async fn ready(&self) -> Result<(), String> {
        let probe = match self.config.mode {
            HttpMode::ComfyUi => format!("{}/system_stats", self.base),
            HttpMode::Json => self.base.clone(),
        };
        match self
            .client
            .get(&probe)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if self.config.mode == HttpMode::Json || r.status().is_success() => Ok(()),
            Ok(r) => Err(format!(
                "{probe} answered {}; is this a ComfyUI server?",
                r.status()
            )),
            Err(e) => Err(format!("cannot reach {probe}: {e}; is the server running?")),
        }
    }
}
