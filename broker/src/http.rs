//! The broker's HTTP API for producers that prefer HTTP to Redis, plus `/metrics`,
//! `/healthz`, `/readyz` and `/openapi.json` (generated from this code).
//!
//! Errors are JSON `{"error": "…"}` saying what was wrong and what to do. With a token
//! configured, every `/v1` route wants `Authorization: Bearer <token>`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::inspect::{self, DeadLetter, QueueState};
use crate::job::{JobState, JobStatus};
use crate::keys::QueueKeys;
use crate::metrics::BrokerMetrics;
use crate::producer::{EnqueueOptions, Enqueued, Producer};
use crate::{functions, Error, Redis};

/// Default largest request body, bytes (a payload at the default queue limit plus its
/// envelope).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024 + 4096;
/// Default and longest wait of `GET …/wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest wait a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// What the API handlers share.
pub struct ApiState {
    redis: Redis,
    metrics: BrokerMetrics,
    token: Option<String>,
    max_body_bytes: usize,
    producers: Mutex<HashMap<String, Producer>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

impl ApiState {
    /// State for the API over `redis`; `queues` limits `/metrics` (empty: every queue).
    pub fn new(
        redis: Redis,
        queues: Vec<String>,
        token: Option<String>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            metrics: BrokerMetrics::new(redis.clone(), queues),
            redis,
            token: token.filter(|t| !t.is_empty()),
            max_body_bytes,
            producers: Mutex::new(HashMap::new()),
        }
    }

    async fn producer(&self, queue: &str) -> Result<Producer, ApiError> {
        QueueKeys::new(queue).map_err(ApiError::bad_request)?;
        if let Some(p) = self
            .producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
        {
            return Ok(p.clone());
        }
        let p = Producer::new(&self.redis, queue).await?;
        self.producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(queue.to_owned(), p.clone());
        Ok(p)
    }
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong and what to do.
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.to_string())
    }

    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, what)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Rejected(m) | Error::Config(m) => Self::new(StatusCode::BAD_REQUEST, m),
            e if e.is_transient() => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; the broker cannot reach Redis right now, try again shortly"),
            ),
            e => Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// A JSON body whose rejections are clear JSON errors: 413 over the size limit, 400 with the
/// parser's message (line and column) for bad JSON or a wrong shape.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body is over the broker's size limit (FLEETQ_MAX_BODY_BYTES); store large inputs elsewhere and send a reference",
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            let what = if e.is_data() {
                "request body does not have the expected fields"
            } else {
                "request body is not valid JSON"
            };
            ApiError::bad_request(format!("{what}: {e}"))
        })
    }
}

/// `POST /v1/queues/{queue}/jobs` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// The job payload: any JSON value.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Idempotency key and job id.
    pub id: Option<String>,
    /// What a node that fails the job may be blocked for.
    pub workflow: Option<String>,
    /// Attempts before dead-lettering, first run included.
    pub max_attempts: Option<u32>,
    /// Expire when not started within this, ms.
    pub queue_timeout_ms: Option<u64>,
    /// Taken but not started within this → timeout, ms.
    pub start_timeout_ms: Option<u64>,
    /// No progress for this long → timeout, ms.
    pub progress_timeout_ms: Option<u64>,
    /// Cap on one attempt, ms.
    pub run_timeout_ms: Option<u64>,
    /// Run no earlier than this from now, ms.
    pub delay_ms: Option<u64>,
    /// W3C trace context.
    pub traceparent: Option<String>,
}

/// `GET …/wait` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WaitQuery {
    /// Longest wait, ms (default 30 000, at most 300 000).
    pub timeout_ms: Option<u64>,
}

/// `GET …/dead` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DeadQuery {
    /// First dead-letter id to list (default: the oldest).
    pub start: Option<String>,
    /// How many (default 100, at most 1000).
    pub count: Option<usize>,
}

/// Answer of a cancel.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CancelAnswer {
    /// The job id.
    pub id: String,
    /// `cancelled`, `cancelling`, or the state the job had already ended in.
    pub state: JobState,
}

/// Answer of a dead-letter retry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetryAnswer {
    /// The job id, back in line.
    pub job: String,
}

/// Answer of a purge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurgeAnswer {
    /// Dead letters deleted.
    pub purged: u64,
}

/// Answer of the health checks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready` or `unready`.
    pub status: String,
    /// Why not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The data servers (on `/readyz` when Redis answered): topology, each primary's
    /// cluster state and library, slots covered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<crate::topology::Health>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetq broker API",
        description = "Enqueue jobs, follow them, and tend the dead letters over HTTP."
    ),
    paths(
        enqueue,
        status,
        wait,
        cancel,
        list_queues,
        list_dead,
        retry_dead,
        purge_dead,
        purge_one_dead,
        healthz,
        readyz
    ),
    components(schemas(
        EnqueueRequest,
        Enqueued,
        JobStatus,
        JobState,
        QueueState,
        DeadLetter,
        CancelAnswer,
        RetryAnswer,
        PurgeAnswer,
        Health,
        ErrorBody
    ))
)]
struct ApiDoc;

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router: `/v1/…` (behind the token when set), `/metrics`, `/healthz`, `/readyz`,
/// `/openapi.json`.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.max_body_bytes;
    let v1 = Router::new()
        .route("/queues", get(list_queues))
        .route("/queues/{queue}/jobs", post(enqueue))
        .route("/queues/{queue}/jobs/{id}", get(status).delete(cancel))
        .route("/queues/{queue}/jobs/{id}/wait", get(wait))
        .route("/queues/{queue}/dead", get(list_dead).delete(purge_dead))
        .route(
            "/queues/{queue}/dead/{dead_id}",
            axum::routing::delete(purge_one_dead),
        )
        .route("/queues/{queue}/dead/{dead_id}/retry", post(retry_dead))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn auth(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(req).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let denied = |msg: &str| {
        let mut r = ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    };
    match given {
        None => {
            denied("missing bearer token: send the header Authorization: Bearer <FLEETQ_API_TOKEN>")
        }
        Some(t)
            if bool::from(subtle::ConstantTimeEq::ct_eq(
                t.as_bytes(),
                token.as_bytes(),
            )) =>
        {
            next.run(req).await
        }
        Some(_) => denied("wrong bearer token: check FLEETQ_API_TOKEN"),
    }
}

/// Enqueue a job. Never refused for being busy: the answer says where it waits.
#[utoipa::path(post, path = "/v1/queues/{queue}/jobs", request_body = EnqueueRequest,
    params(("queue" = String, Path, description = "queue name")),
    responses((status = 202, body = Enqueued), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody)))]
async fn enqueue(
    State(state): State<Arc<ApiState>>,
    Path(queue): Path<String>,
    JsonBody(req): JsonBody<EnqueueRequest>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let p = state.producer(&queue).await?;
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    let opts = EnqueueOptions {
        id: req.id,
        workflow: req.workflow,
        max_attempts: req.max_attempts,
        queue_timeout: ms(req.queue_timeout_ms),
        start_timeout: ms(req.start_timeout_ms),
        progress_timeout: ms(req.progress_timeout_ms),
        run_timeout: ms(req.run_timeout_ms),
        delay: ms(req.delay_ms),
        traceparent: req.traceparent,
    };
    let e = p.enqueue(&req.payload, &opts).await?;
    Ok((StatusCode::ACCEPTED, Json(e)))
}

fn found(st: JobStatus) -> Result<Json<JobStatus>, ApiError> {
    if st.state == JobState::NotFound {
        return Err(ApiError::not_found(format!(
            "no job {} in this queue (never enqueued, or ended longer ago than the queue's retention_ms)",
            st.id
        )));
    }
    Ok(Json(st))
}

/// A job's status: state, position, attempts, node, progress, result or error.
#[utoipa::path(get, path = "/v1/queues/{queue}/jobs/{id}",
    params(("queue" = String, Path, description = "queue name"), ("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobStatus), (status = 404, body = ErrorBody)))]
async fn status(
    State(state): State<Arc<ApiState>>,
    Path((queue, id)): Path<(String, String)>,
) -> Result<Json<JobStatus>, ApiError> {
    found(state.producer(&queue).await?.status(&id).await?)
}

/// Waits until the job ends and answers its final status; 408 with the current status when
/// the wait runs out.
#[utoipa::path(get, path = "/v1/queues/{queue}/jobs/{id}/wait", params(("queue" = String, Path), ("id" = String, Path), WaitQuery),
    responses((status = 200, body = JobStatus), (status = 404, body = ErrorBody), (status = 408, body = ErrorBody)))]
async fn wait(
    State(state): State<Arc<ApiState>>,
    Path((queue, id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<JobStatus>, ApiError> {
    let timeout = q
        .timeout_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(MAX_WAIT);
    let p = state.producer(&queue).await?;
    match p.wait(&id, timeout).await {
        Ok(st) => found(st),
        Err(Error::Timeout { .. }) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "job {id} did not end within {} ms; wait again or read its status",
                timeout.as_millis()
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Cancels a job: a waiting one will not run; a running one's worker is told to stop.
#[utoipa::path(delete, path = "/v1/queues/{queue}/jobs/{id}", params(("queue" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = CancelAnswer), (status = 404, body = ErrorBody)))]
async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path((queue, id)): Path<(String, String)>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let st = state.producer(&queue).await?.cancel(&id).await?;
    if st == JobState::NotFound {
        return Err(ApiError::not_found(format!("no job {id} in queue {queue}")));
    }
    Ok(Json(CancelAnswer { id, state: st }))
}

/// Every queue with its depths.
#[utoipa::path(get, path = "/v1/queues", responses((status = 200, body = [QueueState])))]
async fn list_queues(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Vec<QueueState>>, ApiError> {
    let served = crate::partitions::served(&state.redis, &[]).await?;
    Ok(Json(inspect::queue_states(&state.redis, &served).await?))
}

/// The queue's dead letters, oldest first.
#[utoipa::path(get, path = "/v1/queues/{queue}/dead", params(("queue" = String, Path), DeadQuery),
    responses((status = 200, body = [DeadLetter])))]
async fn list_dead(
    State(state): State<Arc<ApiState>>,
    Path(queue): Path<String>,
    Query(q): Query<DeadQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let keys = QueueKeys::new(&queue).map_err(ApiError::bad_request)?;
    let start = q.start.unwrap_or_else(|| "-".into());
    let count = q.count.unwrap_or(100).clamp(1, 1000);
    Ok(Json(
        inspect::dead_letters(&state.redis, &keys, &start, count).await?,
    ))
}

/// Puts a dead letter back in line as a fresh job.
#[utoipa::path(post, path = "/v1/queues/{queue}/dead/{dead_id}/retry", params(("queue" = String, Path), ("dead_id" = String, Path)),
    responses((status = 200, body = RetryAnswer), (status = 404, body = ErrorBody)))]
async fn retry_dead(
    State(state): State<Arc<ApiState>>,
    Path((queue, dead_id)): Path<(String, String)>,
) -> Result<Json<RetryAnswer>, ApiError> {
    let keys = QueueKeys::new(&queue).map_err(ApiError::bad_request)?;
    match inspect::retry_dead(&state.redis, &keys, &dead_id).await? {
        Some(job) => Ok(Json(RetryAnswer { job })),
        None => Err(ApiError::not_found(format!(
            "no dead letter {dead_id} in queue {queue}"
        ))),
    }
}

/// Deletes every dead letter of the queue.
#[utoipa::path(delete, path = "/v1/queues/{queue}/dead", params(("queue" = String, Path)),
    responses((status = 200, body = PurgeAnswer)))]
async fn purge_dead(
    State(state): State<Arc<ApiState>>,
    Path(queue): Path<String>,
) -> Result<Json<PurgeAnswer>, ApiError> {
    let keys = QueueKeys::new(&queue).map_err(ApiError::bad_request)?;
    Ok(Json(PurgeAnswer {
        purged: inspect::purge_dead(&state.redis, &keys, &[]).await?,
    }))
}

/// Deletes one dead letter.
#[utoipa::path(delete, path = "/v1/queues/{queue}/dead/{dead_id}", params(("queue" = String, Path), ("dead_id" = String, Path)),
    responses((status = 200, body = PurgeAnswer), (status = 404, body = ErrorBody)))]
async fn purge_one_dead(
    State(state): State<Arc<ApiState>>,
    Path((queue, dead_id)): Path<(String, String)>,
) -> Result<Json<PurgeAnswer>, ApiError> {
    let keys = QueueKeys::new(&queue).map_err(ApiError::bad_request)?;
    let purged = inspect::purge_dead(&state.redis, &keys, std::slice::from_ref(&dead_id)).await?;
    if purged == 0 {
        return Err(ApiError::not_found(format!(
            "no dead letter {dead_id} in queue {queue}"
        )));
    }
    Ok(Json(PurgeAnswer { purged }))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match state.metrics.render().await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        error: None,
        redis: None,
    })
}

/// Redis is reachable, every primary has the fleetq functions (loading them if Redis lost
/// them) and, on a cluster, every slot is served and every primary says `cluster_state:ok`.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn readyz(State(state): State<Arc<ApiState>>) -> (StatusCode, Json<Health>) {
    let check = async {
        // The topology first: a cluster that is down says so, rather than failing a load.
        let health = crate::topology::health(&state.redis).await?;
        if !health.only_libraries_missing() {
            return Ok(health);
        }
        // Only libraries missing or older: load them (Redis lost them), then look again.
        functions::load_all(&state.redis.conn()).await?;
        crate::topology::health(&state.redis).await
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(health)) => match health.problem() {
            None => (
                StatusCode::OK,
                Json(Health {
                    status: "ready".into(),
                    error: None,
                    redis: Some(health),
                }),
            ),
            Some(problem) => {
                let (code, mut body) = unready(problem);
                body.redis = Some(health);
                (code, body)
            }
        },
        Ok(Err(e)) => unready(e.to_string()),
        Err(_) => unready("Redis did not answer within 3 s".into()),
    }
}

fn unready(error: String) -> (StatusCode, Json<Health>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(Health {
            status: "unready".into(),
            error: Some(error),
            redis: None,
        }),
    )
}
