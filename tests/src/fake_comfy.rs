//! A fake ComfyUI for the tests: `/prompt`, `/ws`, `/history/{id}`, `/interrupt`,
//! `/system_stats`, and a JSON endpoint `/json` for the generic HTTP mode. Each prompt is
//! scripted by its workflow's `fleetq_test.mode`: `succeed` (default), `hang_before_start`,
//! `stall` (stalls in node KSampler), `error` (CUDA out of memory in node 4).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[derive(Default)]
struct Inner {
    clients: Mutex<HashMap<String, mpsc::UnboundedSender<String>>>,
    interrupts: AtomicUsize,
    prompts: AtomicUsize,
}

/// A running fake server.
pub struct FakeComfy {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeComfy {
    /// Starts on a free port.
    pub async fn start() -> Self {
        Self::start_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    /// Starts on `listener`.
    pub async fn start_on(listener: tokio::net::TcpListener) -> Self {
        let base = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/ws", get(ws))
            .route("/prompt", post(prompt))
            .route("/history/{id}", get(history))
            .route("/interrupt", post(interrupt))
            .route(
                "/system_stats",
                get(|| async { Json(json!({"system": {"os": "fake"}, "devices": []})) }),
            )
            .route("/json", post(json_endpoint).get(|| async { "ok" }))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, inner, task }
    }

    /// Times `/interrupt` was called.
    pub fn interrupts(&self) -> usize {
        self.inner.interrupts.load(Ordering::SeqCst)
    }

    /// Prompts submitted.
    pub fn prompts(&self) -> usize {
        self.inner.prompts.load(Ordering::SeqCst)
    }
}

impl Drop for FakeComfy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ws(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> impl IntoResponse {
    let client = q.get("clientId").cloned().unwrap_or_default();
    upgrade.on_upgrade(move |socket| serve_ws(inner, client, socket))
}

async fn serve_ws(inner: Arc<Inner>, client: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    inner.clients.lock().unwrap().insert(client.clone(), tx);
    let _ = socket
        .send(Message::Text(json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client}}).to_string().into()))
        .await;
    while let Some(text) = rx.recv().await {
        if socket.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
}

async fn prompt(State(inner): State<Arc<Inner>>, Json(body): Json<Value>) -> impl IntoResponse {
    let n = inner.prompts.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("prompt-{n}");
    let client = body["client_id"].as_str().unwrap_or_default().to_owned();
    let mode = body["prompt"]["fleetq_test"]["mode"]
        .as_str()
        .unwrap_or("succeed")
        .to_owned();
    let tx = inner.clients.lock().unwrap().get(&client).cloned();
    if let Some(tx) = tx {
        let pid = id.clone();
        tokio::spawn(async move { script(tx, &pid, &mode).await });
    }
    Json(json!({"prompt_id": id, "number": n, "node_errors": {}}))
}

async fn script(tx: mpsc::UnboundedSender<String>, id: &str, mode: &str) {
    let send = |t: &str, data: Value| {
        let mut d = data;
        d["prompt_id"] = json!(id);
        let _ = tx.send(json!({"type": t, "data": d}).to_string());
    };
    let pause = || tokio::time::sleep(Duration::from_millis(30));
    if mode == "hang_before_start" {
        return;
    }
    pause().await;
    send("execution_start", json!({"timestamp": 0}));
    match mode {
        "stall" => {
            send("executing", json!({"node": "KSampler"}));
            send(
                "progress",
                json!({"value": 1, "max": 20, "node": "KSampler"}),
            );
        }
        "error" => {
            send("executing", json!({"node": "4"}));
            pause().await;
            send(
                "execution_error",
                json!({"node_id": "4", "node_type": "CheckpointLoaderSimple",
                "exception_type": "torch.cuda.OutOfMemoryError", "exception_message": "CUDA out of memory"}),
            );
        }
        _ => {
            send("executing", json!({"node": "3"}));
            for v in 1..=4 {
                pause().await;
                send("progress", json!({"value": v, "max": 4, "node": "3"}));
            }
            send("executing", json!({"node": "9"}));
            send(
                "executed",
                json!({"node": "9", "output": {"images": [{"filename": format!("{id}.png")}]}}),
            );
            send("execution_success", json!({}));
            send("executing", json!({"node": null}));
        }
    }
}

async fn history(Path(id): Path<String>) -> impl IntoResponse {
    Json(
        json!({ id.clone(): {"outputs": {"9": {"images": [{"filename": format!("{id}.png"), "type": "output"}]}},
        "status": {"completed": true}} }),
    )
}

async fn interrupt(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    inner.interrupts.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn json_endpoint(Json(body): Json<Value>) -> impl IntoResponse {
    let status = body["status"].as_u64().unwrap_or(200) as u16;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, Json(json!({"echo": body})))
}
