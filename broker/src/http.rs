//! The broker's HTTP API for producers that prefer HTTP to Redis, plus `/metrics`,
//! `/healthz`, `/readyz` and `/openapi.json` (generated from this code).
//!
//! Every answer that is not a success is JSON `{"error": "…"}` saying what was wrong and
//! what to do, and every bad id or parameter is a 4xx. The rules of `/v1`, checked in this
//! order:
//!
//! - **Who.** With a token configured, `Authorization: Bearer <token>` (401 otherwise).
//!   Without one, only requests addressed to a loopback name (`Host: 127.0.0.1`,
//!   `localhost`, `[::1]`) are served (403 otherwise): a web page that rebinds its own
//!   domain name to 127.0.0.1 cannot reach a tokenless broker. An open API
//!   ([`ApiOptions::open`]) serves any name.
//! - **What.** A `POST` must say `Content-Type: application/json` (415 otherwise), even with
//!   an empty body. Browsers send other types (`text/plain`, forms) from any web page without
//!   asking the server first; JSON they send only after a CORS preflight, which the broker
//!   never grants. So a page in an operator's browser cannot enqueue or retry jobs.
//! - **How much, how fast.** A body over [`ApiOptions::max_body_bytes`] is refused (413); one
//!   that does not arrive within [`ApiOptions::body_timeout`] is cut (408). Connection
//!   limits live in [`crate::listener`].
//!
//! Producers are kept for at most [`MAX_CACHED_PRODUCERS`] queues, the most recently used,
//! so asking for ever new queue names costs no memory.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::inspect::{self, DeadLetter, QueueState};
use crate::job::{JobState, JobStatus};
use crate::keys::QueueKeys;
use crate::metrics::BrokerMetrics;
use crate::producer::{EnqueueOptions, Enqueued, Producer};
use crate::{functions, Error, Redis};

/// Default largest request body, bytes (a payload at the default queue limit plus its
/// envelope).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024 + 4096;
/// Default wait of `GET …/wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// Longest wait a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most dead letters one `GET …/dead` lists.
pub const MAX_DEAD_PAGE: u32 = 1000;
/// Longest job id, and longest `workflow` and `traceparent`, bytes (the enqueue function's
/// limit). The API takes them as printable ASCII, so bytes and characters agree.
pub const MAX_FIELD_LEN: usize = 200;
/// Queues whose producer (and its pool of wait connections) is kept between requests; the
/// least recently used goes first. A request for another queue builds its producer afresh
/// (one more round trip).
pub const MAX_CACHED_PRODUCERS: usize = 128;

// The patterns the OpenAPI document states (utoipa takes them as literals only; a test
// checks that each literal is one of these and that they agree with the checks).
/// The pattern of a queue name, as [`QueueKeys::new`] checks it.
#[cfg(test)]
const QUEUE_PATTERN: &str = "^[A-Za-z0-9._-]{1,100}$";
/// The pattern of a job id, `workflow` and `traceparent` in the API.
#[cfg(test)]
const FIELD_PATTERN: &str = "^[ -~]{1,200}$";
/// The pattern of a dead-letter id, `<ms>-<seq>` (each part fits 64 bits).
#[cfg(test)]
const DEAD_ID_PATTERN: &str = "^[0-9]{1,19}(-[0-9]{1,19})?$";
/// The pattern of `start`: a dead-letter id or `-`.
#[cfg(test)]
const START_PATTERN: &str = "^(-|[0-9]{1,19}(-[0-9]{1,19})?)$";

/// How the API guards itself.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Bearer token wanted on `/v1`; none: only loopback names are served, unless `open`.
    pub token: Option<String>,
    /// Serve `/v1` without a token whatever name the request is addressed to.
    pub open: bool,
    /// Largest request body. Default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Deadline for a request body, from its headers. Default
    /// [`crate::listener::DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            token: None,
            open: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_timeout: crate::listener::DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// What the API handlers share.
pub struct ApiState {
    redis: Redis,
    metrics: BrokerMetrics,
    options: ApiOptions,
    /// Producers of recently used queues: each holds the wait connections of its queue,
    /// worth keeping between requests; bounded, so that queue names cost no memory.
    producers: Mutex<lru::LruCache<String, Producer>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

impl ApiState {
    /// State for the API over `redis`; `queues` limits `/metrics` (empty: every queue).
    pub fn new(redis: Redis, queues: Vec<String>, options: ApiOptions) -> Self {
        let cap = NonZeroUsize::new(MAX_CACHED_PRODUCERS).unwrap_or(NonZeroUsize::MIN);
        Self {
            metrics: BrokerMetrics::new(redis.clone(), queues),
            redis,
            options: ApiOptions {
                token: options.token.filter(|t| !t.is_empty()),
                ..options
            },
            producers: Mutex::new(lru::LruCache::new(cap)),
        }
    }

    async fn producer(&self, queue: &str) -> Result<Producer, ApiError> {
        queue_keys(queue)?;
        let cached = self
            .producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .cloned();
        if let Some(p) = cached {
            return Ok(p);
        }
        let p = Producer::new(&self.redis, queue).await?;
        self.producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(queue.to_owned(), p.clone());
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

/// The keys of `queue`, or a 400 naming the rule.
fn queue_keys(queue: &str) -> Result<QueueKeys, ApiError> {
    QueueKeys::new(queue).map_err(ApiError::from)
}

/// `value` when it is 1 to [`MAX_FIELD_LEN`] printable ASCII characters; a 400 naming
/// `what` otherwise.
fn check_field<'a>(what: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let ok = (1..=MAX_FIELD_LEN).contains(&value.len())
        && value.bytes().all(|b| (b' '..=b'~').contains(&b));
    if ok {
        return Ok(value);
    }
    Err(ApiError::bad_request(format!(
        "invalid {what} {:?}: use 1 to {MAX_FIELD_LEN} printable ASCII characters",
        value.chars().take(MAX_FIELD_LEN).collect::<String>()
    )))
}

/// `id` when it is a dead-letter id (`<ms>-<seq>`, each part at most 19 digits); a 400
/// otherwise.
fn check_dead_id(id: &str) -> Result<&str, ApiError> {
    let number = |p: &str| (1..=19).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    let ok = match id.split_once('-') {
        Some((ms, seq)) => number(ms) && number(seq),
        None => number(id),
    };
    if ok {
        return Ok(id);
    }
    Err(ApiError::bad_request(format!(
        "invalid dead letter id {:?}: expected <ms>-<seq> such as 1700000000000-0, as GET /v1/queues/{{queue}}/dead lists them",
        id.chars().take(100).collect::<String>()
    )))
}

/// Path parameters whose rejections are JSON 400s.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "{}; see /openapi.json for the path's form",
                e.body_text()
            ))),
        }
    }
}

/// Query parameters whose rejections are JSON 400s.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "{}; see /openapi.json for the parameters and their ranges",
                e.body_text()
            ))),
        }
    }
}

/// A JSON body whose rejections are clear JSON errors: 415 without `Content-Type:
/// application/json` (see the module docs for why), 413 over the size limit, 408 when it
/// does not arrive within the body timeout, 400 with the parser's message (line and column)
/// for bad JSON or a wrong shape. An empty body reads as `{}`.
pub struct JsonBody<T>(pub T);

impl<T> FromRequest<Arc<ApiState>> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<ApiState>) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            let given = req
                .headers()
                .get(header::CONTENT_TYPE)
                .map_or("none".into(), |v| {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                });
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the request with the header Content-Type: application/json (got {given}), also when the body is empty"),
            ));
        }
        let limit = state.options.body_timeout;
        let read = axum::body::Bytes::from_request(req, state);
        let bytes = match tokio::time::timeout(limit, read).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body is over the broker's size limit (FLEETQ_MAX_BODY_BYTES); store large inputs elsewhere and send a reference",
                ))
            }
            Ok(Err(e)) => {
                return Err(ApiError::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} ms (FLEETQ_HTTP_BODY_TIMEOUT_MS); send it whole, with a Content-Length that matches it",
                        limit.as_millis()
                    ),
                ))
            }
        };
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(bytes).map(JsonBody).map_err(|e| {
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
    /// The job payload: any JSON value, at most the queue's `max_payload_bytes` as text.
    #[schema(value_type = Value)]
    pub payload: serde_json::Value,
    /// Idempotency key and job id (printable ASCII).
    #[schema(min_length = 1, max_length = 200, pattern = "^[ -~]{1,200}$")]
    pub id: Option<String>,
    /// What a node that fails the job may be blocked for (printable ASCII).
    #[schema(min_length = 1, max_length = 200, pattern = "^[ -~]{1,200}$")]
    pub workflow: Option<String>,
    /// Attempts before dead-lettering, first run included.
    #[schema(minimum = 1, maximum = 1000000)]
    #[serde(default, deserialize_with = "whole_number")]
    pub max_attempts: Option<u32>,
    /// Expire when not started within this, ms.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64)] // limits::MAX_MS
    #[serde(default, deserialize_with = "whole_number")]
    pub queue_timeout_ms: Option<u64>,
    /// Taken but not started within this → timeout, ms.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64)] // limits::MAX_MS
    #[serde(default, deserialize_with = "whole_number")]
    pub start_timeout_ms: Option<u64>,
    /// No progress for this long → timeout, ms.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64)] // limits::MAX_MS
    #[serde(default, deserialize_with = "whole_number")]
    pub progress_timeout_ms: Option<u64>,
    /// Cap on one attempt, ms.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_u64)] // limits::MAX_MS
    #[serde(default, deserialize_with = "whole_number")]
    pub run_timeout_ms: Option<u64>,
    /// Run no earlier than this from now, ms.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)] // limits::MAX_MS
    #[serde(default, deserialize_with = "whole_number")]
    pub delay_ms: Option<u64>,
    /// W3C trace context (printable ASCII).
    #[schema(min_length = 1, max_length = 200, pattern = "^[ -~]{1,200}$")]
    pub traceparent: Option<String>,
}

/// Reads an optional whole number that JSON may spell as an integer or as a float with no
/// fraction (`5.0`: JSON Schema calls that an integer too); refuses fractions, negatives and
/// numbers out of `T`'s range.
fn whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    });
    whole
        .and_then(|v| T::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number in range")))
}

/// `POST …/dead/{dead_id}/retry` body: nothing, `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {}

/// The path of a queue.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct QueuePath {
    /// Queue name: letters, digits, `-`, `_`, `.`.
    #[param(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._-]{1,100}$")]
    pub queue: String,
}

/// The path of a job.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobPath {
    /// Queue name: letters, digits, `-`, `_`, `.`.
    #[param(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._-]{1,100}$")]
    pub queue: String,
    /// Job id: the `id` given at enqueue, or the one answered (printable ASCII).
    #[param(min_length = 1, max_length = 200, pattern = "^[ -~]{1,200}$")]
    pub id: String,
}

/// The path of a dead letter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeadPath {
    /// Queue name: letters, digits, `-`, `_`, `.`.
    #[param(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9._-]{1,100}$")]
    pub queue: String,
    /// Dead-letter id `<ms>-<seq>`, as the list shows it.
    #[param(
        min_length = 1,
        max_length = 39,
        pattern = "^[0-9]{1,19}(-[0-9]{1,19})?$"
    )]
    pub dead_id: String,
}

/// `GET …/wait` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Longest wait, ms (default 30 000, at most 300 000).
    #[param(minimum = 0, maximum = 300000, nullable = false)]
    pub timeout_ms: Option<u64>,
}

/// `GET …/dead` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// First dead-letter id to list, `<ms>-<seq>` (default `-`: the oldest).
    #[param(
        min_length = 1,
        max_length = 39,
        pattern = "^(-|[0-9]{1,19}(-[0-9]{1,19})?)$",
        nullable = false
    )]
    pub start: Option<String>,
    /// How many (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000, nullable = false)]
    pub count: Option<u32>,
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
#[schema(as = HealthAnswer)]
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
        description = "Enqueue jobs, follow them, and tend the dead letters over HTTP. \
            With a token configured, /v1 wants `Authorization: Bearer <token>`; every POST \
            wants `Content-Type: application/json`. Errors are `{\"error\": \"…\"}`."
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
        RetryRequest,
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
    )),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// Adds the `bearer` security scheme that the `/v1` operations name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "FLEETQ_API_TOKEN; required whenever the broker has a token (always when it \
                 listens beyond loopback, unless started with --open-api)",
            ))
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router: `/v1/…` (behind [`guard`]), `/metrics`, `/healthz`, `/readyz`,
/// `/openapi.json`; a path or method that does not exist answers a JSON 404 or 405.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.options.max_body_bytes;
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
        .layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .nest("/v1", v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(middleware::map_response(json_refusals))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Gives the router's own bodiless refusals (no such path, no such method) the JSON error
/// shape, keeping their headers (`Allow` on a 405).
async fn json_refusals(r: Response) -> Response {
    let plain = !r.headers().contains_key(header::CONTENT_TYPE);
    let message = match r.status() {
        StatusCode::NOT_FOUND if plain => "no such path; see /openapi.json for the API's paths",
        StatusCode::METHOD_NOT_ALLOWED if plain => {
            "this path does not take that method; the Allow header lists the ones it takes"
        }
        _ => return r,
    };
    let (parts, _) = r.into_parts();
    let mut out = ApiError::new(parts.status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Who may use `/v1` (see the module docs): the token, or a loopback name.
async fn guard(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    match allowed(&state.options, &headers) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let unauthorized = e.status == StatusCode::UNAUTHORIZED;
            let mut r = e.into_response();
            if unauthorized {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

/// Whether the caller may use `/v1`: the token when there is one; else a loopback name
/// unless the API is open.
fn allowed(options: &ApiOptions, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &options.token else {
        if options.open || addressed_to_loopback(headers) {
            return Ok(());
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this broker has no API token, so it serves /v1 only to requests addressed to 127.0.0.1, localhost or [::1]; use one of those names, or set FLEETQ_API_TOKEN and send Authorization: Bearer <token>",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let denied = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, msg);
    match given {
        None => Err(denied(
            "missing bearer token: send the header Authorization: Bearer <FLEETQ_API_TOKEN>",
        )),
        Some(t)
            if bool::from(subtle::ConstantTimeEq::ct_eq(
                t.as_bytes(),
                token.as_bytes(),
            )) =>
        {
            Ok(())
        }
        Some(_) => Err(denied("wrong bearer token: check FLEETQ_API_TOKEN")),
    }
}

/// True when the request's `Host` is a loopback address or `localhost` (with any port), or
/// absent (no browser sends a request without one).
fn addressed_to_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// True when the request says its body is JSON (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The refusals any `/v1` operation may answer, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only described, never built: the answers come from `ApiError`.
enum Refusals {
    /// A queue name, id or parameter that breaks its rule; the message names the rule.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The broker has a token and the request has none, or another one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The broker has no token and the request was addressed to a name that is not loopback.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Redis cannot be reached right now; try again shortly.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The refusals of a `POST`, besides [`Refusals`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only described, never built: the answers come from `ApiError`.
enum PostRefusals {
    /// The body did not arrive within the body timeout.
    #[response(status = 408)]
    BodyTimeout(ErrorBody),
    /// The body is over the size limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The request's Content-Type is not application/json.
    #[response(status = 415)]
    NotJson(ErrorBody),
}

/// Enqueue a job. Never refused for being busy: the answer says where it waits.
#[utoipa::path(post, path = "/v1/queues/{queue}/jobs", request_body = EnqueueRequest,
    params(QueuePath), security(("bearer" = [])),
    responses((status = 202, description = "queued (or already known by its id)", body = Enqueued),
        Refusals, PostRefusals))]
async fn enqueue(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<QueuePath>,
    JsonBody(req): JsonBody<EnqueueRequest>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let p = state.producer(&path.queue).await?;
    for (what, v) in [
        ("id", &req.id),
        ("workflow", &req.workflow),
        ("traceparent", &req.traceparent),
    ] {
        if let Some(v) = v {
            check_field(what, v)?;
        }
    }
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
#[utoipa::path(get, path = "/v1/queues/{queue}/jobs/{id}", params(JobPath), security(("bearer" = [])),
    responses((status = 200, description = "the job's status", body = JobStatus),
        (status = 404, description = "no such job", body = ErrorBody), Refusals))]
async fn status(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<JobPath>,
) -> Result<Json<JobStatus>, ApiError> {
    let id = check_field("job id", &path.id)?;
    found(state.producer(&path.queue).await?.status(id).await?)
}

/// Waits until the job ends and answers its final status; 408 when the wait runs out.
#[utoipa::path(get, path = "/v1/queues/{queue}/jobs/{id}/wait", params(JobPath, WaitQuery), security(("bearer" = [])),
    responses((status = 200, description = "the job ended: its final status", body = JobStatus),
        (status = 404, description = "no such job", body = ErrorBody),
        (status = 408, description = "the job did not end within timeout_ms; wait again", body = ErrorBody),
        Refusals))]
async fn wait(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<JobPath>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<JobStatus>, ApiError> {
    let id = check_field("job id", &path.id)?;
    let timeout = q.timeout_ms.map_or(DEFAULT_WAIT, Duration::from_millis);
    if timeout > MAX_WAIT {
        return Err(ApiError::bad_request(format!(
            "timeout_ms is {}; use 0 to {}, and wait again to wait longer",
            timeout.as_millis(),
            MAX_WAIT.as_millis()
        )));
    }
    let p = state.producer(&path.queue).await?;
    match p.wait(id, timeout).await {
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
#[utoipa::path(delete, path = "/v1/queues/{queue}/jobs/{id}", params(JobPath), security(("bearer" = [])),
    responses((status = 200, description = "the state the job is in now", body = CancelAnswer),
        (status = 404, description = "no such job", body = ErrorBody), Refusals))]
async fn cancel(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<JobPath>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let id = check_field("job id", &path.id)?;
    let st = state.producer(&path.queue).await?.cancel(id).await?;
    if st == JobState::NotFound {
        return Err(ApiError::not_found(format!(
            "no job {id} in queue {}",
            path.queue
        )));
    }
    Ok(Json(CancelAnswer {
        id: path.id,
        state: st,
    }))
}

/// Every queue with its depths.
#[utoipa::path(get, path = "/v1/queues", security(("bearer" = [])),
    responses((status = 200, description = "every queue found in Redis", body = [QueueState]), Refusals))]
async fn list_queues(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Vec<QueueState>>, ApiError> {
    let served = crate::partitions::served(&state.redis, &[]).await?;
    Ok(Json(inspect::queue_states(&state.redis, &served).await?))
}

/// The queue's dead letters, oldest first.
#[utoipa::path(get, path = "/v1/queues/{queue}/dead", params(QueuePath, DeadQuery), security(("bearer" = [])),
    responses((status = 200, description = "dead letters from `start`, oldest first", body = [DeadLetter]), Refusals))]
async fn list_dead(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<QueuePath>,
    ApiQuery(q): ApiQuery<DeadQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let keys = queue_keys(&path.queue)?;
    let start = match q.start.as_deref() {
        None | Some("-") => "-",
        Some(id) => check_dead_id(id)?,
    };
    let count = q.count.unwrap_or(100);
    if !(1..=MAX_DEAD_PAGE).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "count is {count}; use 1 to {MAX_DEAD_PAGE}, and page on with start"
        )));
    }
    Ok(Json(
        inspect::dead_letters(&state.redis, &keys, start, count as usize).await?,
    ))
}

/// Puts a dead letter back in line as a fresh job. Takes no body (or `{}`), but wants
/// `Content-Type: application/json` like every `POST`.
#[utoipa::path(post, path = "/v1/queues/{queue}/dead/{dead_id}/retry", params(DeadPath), security(("bearer" = [])),
    request_body(content = RetryRequest, description = "`{}` or an empty body, with `Content-Type: application/json`"),
    responses((status = 200, description = "the job is back in line", body = RetryAnswer),
        (status = 404, description = "no such dead letter", body = ErrorBody),
        Refusals, PostRefusals))]
async fn retry_dead(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<DeadPath>,
    JsonBody(RetryRequest {}): JsonBody<RetryRequest>,
) -> Result<Json<RetryAnswer>, ApiError> {
    let keys = queue_keys(&path.queue)?;
    let dead_id = check_dead_id(&path.dead_id)?;
    match inspect::retry_dead(&state.redis, &keys, dead_id).await? {
        Some(job) => Ok(Json(RetryAnswer { job })),
        None => Err(ApiError::not_found(format!(
            "no dead letter {dead_id} in queue {}",
            path.queue
        ))),
    }
}

/// Deletes every dead letter of the queue.
#[utoipa::path(delete, path = "/v1/queues/{queue}/dead", params(QueuePath), security(("bearer" = [])),
    responses((status = 200, description = "how many were deleted", body = PurgeAnswer), Refusals))]
async fn purge_dead(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<QueuePath>,
) -> Result<Json<PurgeAnswer>, ApiError> {
    let keys = queue_keys(&path.queue)?;
    Ok(Json(PurgeAnswer {
        purged: inspect::purge_dead(&state.redis, &keys, &[]).await?,
    }))
}

/// Deletes one dead letter.
#[utoipa::path(delete, path = "/v1/queues/{queue}/dead/{dead_id}", params(DeadPath), security(("bearer" = [])),
    responses((status = 200, description = "deleted", body = PurgeAnswer),
        (status = 404, description = "no such dead letter", body = ErrorBody), Refusals))]
async fn purge_one_dead(
    State(state): State<Arc<ApiState>>,
    ApiPath(path): ApiPath<DeadPath>,
) -> Result<Json<PurgeAnswer>, ApiError> {
    let keys = queue_keys(&path.queue)?;
    let dead_id = check_dead_id(&path.dead_id)?.to_owned();
    let purged = inspect::purge_dead(&state.redis, &keys, std::slice::from_ref(&dead_id)).await?;
    if purged == 0 {
        return Err(ApiError::not_found(format!(
            "no dead letter {dead_id} in queue {}",
            path.queue
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
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "the process is up", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        error: None,
        redis: None,
    })
}

/// Redis is reachable, every primary has the fleetq functions (loading them if Redis lost
/// them) and, on a cluster, every slot is served and every primary says `cluster_state:ok`.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready to serve", body = Health),
    (status = 503, description = "not ready: `error` says why", body = Health)))]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string pattern the document states, with where.
    fn patterns(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("pattern", serde_json::Value::String(p)) => {
                            out.push((at.to_owned(), p.clone()))
                        }
                        _ => patterns(v, &format!("{at}/{k}"), out),
                    }
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    patterns(v, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_documents_number_ranges_are_the_functions() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let props = &doc["components"]["schemas"]["EnqueueRequest"]["properties"];
        let mut checked = 0;
        for field in crate::limits::ENTRY_NUMBERS {
            let Some(p) = props.get(field.name) else {
                continue;
            };
            let range = field.range();
            assert_eq!(p["maximum"], *range.end(), "{}", field.name);
            assert_eq!(p["minimum"], *range.start(), "{}", field.name);
            checked += 1;
        }
        // max_attempts, four timeouts, delay_ms.
        assert_eq!(checked, 6, "{props}");
    }

    #[test]
    fn the_documents_patterns_are_the_ones_the_checks_apply() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut found = Vec::new();
        patterns(&doc, "", &mut found);
        let known = [QUEUE_PATTERN, FIELD_PATTERN, DEAD_ID_PATTERN, START_PATTERN];
        assert!(found.len() >= 10, "{found:?}");
        for (at, p) in &found {
            assert!(known.contains(&p.as_str()), "{at}: unknown pattern {p}");
        }
        let m = |p: &str, s: &str| regex::Regex::new(p).unwrap().is_match(s);
        let long = "q".repeat(crate::keys::MAX_QUEUE_NAME_LEN + 1);
        for name in [
            "img", "a.b-c_D9", "", "a:b", "a{b}", "a b", "é", "a#1", &long,
        ] {
            assert_eq!(
                m(QUEUE_PATTERN, name),
                QueueKeys::new(name).is_ok(),
                "queue {name:?}"
            );
        }
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        for id in ["job-1", "a b", "~!", "", "é", "a\u{1}b", "a\u{7f}", &long] {
            assert_eq!(
                m(FIELD_PATTERN, id),
                check_field("id", id).is_ok(),
                "id {id:?}"
            );
        }
        let long = "1".repeat(20);
        for id in [
            "1-0",
            "1700000000000-12",
            "5",
            "",
            "-",
            "1-",
            "-1",
            "1-x",
            "a",
            &long,
        ] {
            assert_eq!(
                m(DEAD_ID_PATTERN, id),
                check_dead_id(id).is_ok(),
                "dead id {id:?}"
            );
            assert_eq!(
                m(START_PATTERN, id),
                id == "-" || check_dead_id(id).is_ok(),
                "start {id:?}"
            );
        }
    }

    #[test]
    fn loopback_names_are_told_from_others() {
        let with_host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
            addressed_to_loopback(&m)
        };
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:80",
            "[::1]",
            "127.9.9.9",
        ] {
            assert!(with_host(ok), "{ok}");
        }
        for no in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "[::2]:80",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!with_host(no), "{no}");
        }
    }

    #[test]
    fn whole_numbers_may_be_spelled_as_floats() {
        #[derive(Deserialize)]
        struct N {
            #[serde(default, deserialize_with = "whole_number")]
            n: Option<u32>,
        }
        let n = |text: &str| serde_json::from_str::<N>(text).map(|v| v.n);
        assert_eq!(n(r#"{"n": 3}"#).unwrap(), Some(3));
        assert_eq!(n(r#"{"n": 3.0}"#).unwrap(), Some(3));
        assert_eq!(n(r#"{"n": null}"#).unwrap(), None);
        assert_eq!(n(r#"{}"#).unwrap(), None);
        for bad in [
            r#"{"n": 3.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": 4294967296}"#,
            r#"{"n": "3"}"#,
        ] {
            assert!(n(bad).is_err(), "{bad}");
        }
    }
}
