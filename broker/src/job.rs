//! The job envelope: what a stream entry must hold to be a job, and what a job's status says.
//!
//! A stream entry is a flat list of string fields. Only `payload` is required; see
//! `docs/protocol.md` for every field. [`JobEntry::parse`] checks an entry the way a worker
//! must before running it; an entry that fails the check is [`Malformed`] and goes to the
//! dead letters with the reason, never crashing anything. Numbers follow the one rule of
//! [`limits`](crate::limits), which the functions share.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::limits::{self, ENTRY_FIELDS_MAX};
use crate::queue_config::QueueConfig;

/// A stream entry as read from Redis: its id and its fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// The stream entry id, `<ms>-<seq>`.
    pub id: String,
    /// Field names and raw values, in the entry's order (the first of two equal names is the
    /// one read, as in the functions). A name that is not UTF-8 is kept with `U+FFFD` for its
    /// bad bytes, and the entry is [malformed](Malformed::FieldNameNotUtf8).
    pub fields: Vec<(String, Vec<u8>)>,
}

impl RawEntry {
    /// An entry from its id and raw field names and values.
    pub fn from_bytes(id: String, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            id,
            fields: fields
                .into_iter()
                .map(|(f, v)| {
                    let name = String::from_utf8(f)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                    (name, v)
                })
                .collect(),
        }
    }

    /// The first field name that is not UTF-8 (shown with `U+FFFD`), if any.
    fn bad_name(&self) -> Option<&str> {
        self.fields
            .iter()
            .map(|(f, _)| f.as_str())
            .find(|f| f.contains(char::REPLACEMENT_CHARACTER))
    }

    /// The job id this entry carries: its `id` field when that is valid text, else the entry id.
    pub fn job_id(&self) -> String {
        self.fields
            .iter()
            .find(|(f, _)| f == "id")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map_or_else(|| self.id.clone(), str::to_owned)
    }
}

/// Why an entry is not a valid job. The `Display` text is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// More fields than an entry may carry ([`ENTRY_FIELDS_MAX`]).
    #[error("entry has {count} fields, more than the {max} a job may carry; put large or many inputs in the payload, or pass a reference to them")]
    TooManyFields {
        /// Fields of the entry.
        count: usize,
        /// [`ENTRY_FIELDS_MAX`].
        max: usize,
    },
    /// A field name is not UTF-8.
    #[error("field name {0:?} is not UTF-8 (bad bytes shown as U+FFFD); write field names as UTF-8 text")]
    FieldNameNotUtf8(String),
    /// No `payload` field.
    #[error("entry has no payload field; add the job as XADD <stream> * payload '<json>'")]
    MissingPayload,
    /// The payload is not UTF-8 JSON.
    #[error("payload is not valid JSON ({0}); send a JSON text such as {{\"prompt\":\"…\"}}")]
    PayloadNotJson(String),
    /// The payload is over the queue's limit.
    #[error("payload is {size} bytes, over the queue limit of {limit} (config max_payload_bytes); pass a reference to large inputs instead")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The queue's `max_payload_bytes`.
        limit: usize,
    },
    /// A numeric field holds something else than a whole number of its range (see
    /// [`limits`](crate::limits)).
    #[error("field {field} must be a whole number from {min} to {max} (decimal digits only), got {value:?}")]
    BadNumber {
        /// Field name.
        field: String,
        /// The value found (cut to 100 bytes).
        value: String,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// A known field holds a value of the wrong type.
    #[error("field {field} must be {expected}, got {value:?}")]
    BadField {
        /// Field name.
        field: String,
        /// What the field must hold.
        expected: &'static str,
        /// The value found (cut to 100 bytes).
        value: String,
    },
}

/// Per-job limits: each overrides the queue default when set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobLimits {
    /// Field `max_attempts`.
    pub max_attempts: Option<u32>,
    /// Field `queue_timeout_ms`.
    pub queue_timeout: Option<Duration>,
    /// Field `start_timeout_ms`.
    pub start_timeout: Option<Duration>,
    /// Field `progress_timeout_ms`.
    pub progress_timeout: Option<Duration>,
    /// Field `run_timeout_ms`.
    pub run_timeout: Option<Duration>,
}

/// A valid job read from the stream.
#[derive(Debug, Clone)]
pub struct JobEntry {
    /// The stream entry id (changes when a retry is re-added).
    pub entry_id: String,
    /// The job id (field `id`, else the first entry id); stable across retries.
    pub job_id: String,
    /// The payload, parsed.
    pub payload: serde_json::Value,
    /// Field `workflow`: what a failing node may be blocked for.
    pub workflow: Option<String>,
    /// Field `traceparent`, passed through to handlers.
    pub traceparent: Option<String>,
    /// Per-job limits.
    pub limits: JobLimits,
    /// Field `attempts`: attempts made before this entry was added (retries, releases).
    pub prior_attempts: u32,
    /// Field `enqueued_ms`, else the entry id's time: when the job was first enqueued.
    pub enqueued_ms: u64,
    /// Field `avoid`: nodes where earlier attempts failed.
    pub avoid: Vec<String>,
    /// Field `avoid_until`: until when (ms since the epoch) the `avoid` nodes are avoided.
    pub avoid_until: u64,
    /// Field `passes`: times an avoided node handed the job on.
    pub passes: u32,
}

impl JobEntry {
    /// Checks an entry and turns it into a job. Unknown fields are ignored (a newer producer
    /// may add some); known fields must have the right type.
    pub fn parse(raw: &RawEntry, max_payload_bytes: usize) -> Result<Self, Malformed> {
        if raw.fields.len() > ENTRY_FIELDS_MAX {
            return Err(Malformed::TooManyFields {
                count: raw.fields.len(),
                max: ENTRY_FIELDS_MAX,
            });
        }
        if let Some(name) = raw.bad_name() {
            return Err(Malformed::FieldNameNotUtf8(
                name.chars().take(100).collect(),
            ));
        }
        let fields = Fields::new(raw);
        // The checks run in this order so an entry with several faults always reports the same
        // one (the first), which keeps dead-letter reasons stable.
        let payload = fields.payload(max_payload_bytes)?;
        let limits = fields.limits()?;
        let enqueued_ms = fields
            .num("enqueued_ms")?
            .unwrap_or_else(|| entry_ms(&raw.id));
        let prior_attempts = fields.count("attempts")?;
        // Not used here, but read by the functions (positions): checked like the others.
        fields.num("seq")?;
        Ok(JobEntry {
            entry_id: raw.id.clone(),
            job_id: fields
                .text("id")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| raw.id.clone()),
            payload,
            workflow: fields.text("workflow")?,
            traceparent: fields.text("traceparent")?,
            limits,
            prior_attempts,
            enqueued_ms,
            avoid: fields.avoid()?,
            avoid_until: fields.num("avoid_until")?.unwrap_or(0),
            passes: fields.count("passes")?,
        })
    }

    /// The attempts this job may make: its own limit, else the queue's.
    pub fn max_attempts(&self, queue: &QueueConfig) -> u32 {
        self.limits.max_attempts.unwrap_or(queue.max_attempts)
    }

    /// The queue timeout in force: the job's own, else the queue's.
    pub fn queue_timeout(&self, queue: &QueueConfig) -> Option<Duration> {
        self.limits.queue_timeout.or(queue.queue_timeout)
    }

    /// The start timeout in force.
    pub fn start_timeout(&self, queue: &QueueConfig) -> Option<Duration> {
        self.limits.start_timeout.or(queue.start_timeout)
    }

    /// The progress timeout in force.
    pub fn progress_timeout(&self, queue: &QueueConfig) -> Option<Duration> {
        self.limits.progress_timeout.or(queue.progress_timeout)
    }

    /// The run timeout in force.
    pub fn run_timeout(&self, queue: &QueueConfig) -> Option<Duration> {
        self.limits.run_timeout.or(queue.run_timeout)
    }
}

/// Checks that `payload` is one JSON text as a worker will read it ([`JobEntry::parse`]: the
/// same parser, nesting limit and number ranges), without building its value. Producers
/// check here because the functions do not parse payloads (parsing a large one would stall
/// Redis); an entry added another way (a plain `XADD`, an `FCALL` from another language) is
/// checked by the worker, which dead-letters it as [`Malformed::PayloadNotJson`].
pub fn check_payload(payload: &str) -> Result<(), Malformed> {
    serde_json::from_str::<JsonText>(payload)
        .map(|_| ())
        .map_err(|e| Malformed::PayloadNotJson(e.to_string()))
}

/// A JSON value read and dropped. Not `serde::de::IgnoredAny`: serde_json skips an ignored
/// value without its nesting limit or number checks, so it would pass texts that reading a
/// `serde_json::Value` refuses. Reading through `deserialize_any` applies both, as `Value`
/// does, and keeps nothing.
struct JsonText;

impl<'de> serde::Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonTextVisitor)
    }
}

struct JsonTextVisitor;

impl<'de> serde::de::Visitor<'de> for JsonTextVisitor {
    type Value = JsonText;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_i64<E>(self, _: i64) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_u64<E>(self, _: u64) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_f64<E>(self, _: f64) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_str<E>(self, _: &str) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_unit<E>(self) -> Result<JsonText, E> {
        Ok(JsonText)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonText, A::Error> {
        while seq.next_element::<JsonText>()?.is_some() {}
        Ok(JsonText)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonText, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, JsonText>()?
            .is_some()
        {}
        Ok(JsonText)
    }
}

/// An entry's fields by name, with the typed readers [`JobEntry::parse`] uses.
struct Fields<'a>(HashMap<&'a str, &'a [u8]>);

impl<'a> Fields<'a> {
    /// The entry's fields; of two equal names the first counts, as in the functions.
    fn new(raw: &'a RawEntry) -> Self {
        let mut map = HashMap::with_capacity(raw.fields.len());
        for (f, v) in &raw.fields {
            map.entry(f.as_str()).or_insert(v.as_slice());
        }
        Self(map)
    }

    /// The payload: present, within the size limit (checked before parsing, so a huge entry
    /// costs no JSON work), and JSON.
    fn payload(&self, max_payload_bytes: usize) -> Result<serde_json::Value, Malformed> {
        let payload = self.0.get("payload").ok_or(Malformed::MissingPayload)?;
        if payload.len() > max_payload_bytes {
            return Err(Malformed::PayloadTooLarge {
                size: payload.len(),
                limit: max_payload_bytes,
            });
        }
        serde_json::from_slice(payload).map_err(|e| Malformed::PayloadNotJson(e.to_string()))
    }

    /// A text field of at most 200 bytes.
    fn text(&self, name: &str) -> Result<Option<String>, Malformed> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) if s.len() <= 200 => Ok(Some(s.to_owned())),
                _ => Err(bad(name, "UTF-8 text of at most 200 bytes", v)),
            },
        }
    }

    /// A numeric field, by the rule and range of [`limits`](crate::limits).
    fn num(&self, name: &str) -> Result<Option<u64>, Malformed> {
        let Some(v) = self.0.get(name) else {
            return Ok(None);
        };
        let field = limits::entry_field(name);
        limits::whole(v, field.range())
            .map(Some)
            .ok_or_else(|| Malformed::BadNumber {
                field: name.to_owned(),
                value: shown(v),
                min: field.min,
                max: field.max,
            })
    }

    /// A counter field (`attempts`, `passes`); missing is 0.
    fn count(&self, name: &str) -> Result<u32, Malformed> {
        // In range, so it fits (the ranges are far below u32::MAX).
        Ok(self.num(name)?.map_or(0, |v| v as u32))
    }

    /// A timeout field: a positive number of milliseconds.
    fn positive_ms(&self, name: &str) -> Result<Option<Duration>, Malformed> {
        Ok(self.num(name)?.map(Duration::from_millis))
    }

    fn max_attempts(&self) -> Result<Option<u32>, Malformed> {
        // In range, so it fits.
        Ok(self.num("max_attempts")?.map(|v| v as u32))
    }

    fn limits(&self) -> Result<JobLimits, Malformed> {
        Ok(JobLimits {
            max_attempts: self.max_attempts()?,
            queue_timeout: self.positive_ms("queue_timeout_ms")?,
            start_timeout: self.positive_ms("start_timeout_ms")?,
            progress_timeout: self.positive_ms("progress_timeout_ms")?,
            run_timeout: self.positive_ms("run_timeout_ms")?,
        })
    }

    /// The comma-separated `avoid` list; read leniently (it is written only by fleetq).
    /// `avoid`: at most [`MAX_AVOID`] node names (1–100 letters, digits, `-`, `_`, `.`),
    /// comma-separated, as fleetq writes it.
    fn avoid(&self) -> Result<Vec<String>, Malformed> {
        let Some(v) = self.0.get("avoid") else {
            return Ok(Vec::new());
        };
        let node = |n: &str| {
            n.len() <= 100
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        let names: Option<Vec<String>> = std::str::from_utf8(v).ok().and_then(|s| {
            let names: Vec<String> = s
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            (names.len() <= MAX_AVOID && names.iter().all(|n| node(n))).then_some(names)
        });
        names.ok_or_else(|| {
            bad(
                "avoid",
                "at most 8 comma-separated node names (letters, digits, '-', '_', '.'; fleetq writes this field)",
                v,
            )
        })
    }
}

/// Most node names an entry's `avoid` holds (fleetq keeps the 8 most recent).
pub const MAX_AVOID: usize = 8;

fn bad(field: &str, expected: &'static str, value: &[u8]) -> Malformed {
    Malformed::BadField {
        field: field.to_owned(),
        expected,
        value: shown(value),
    }
}

/// A value as a reason shows it: lossy UTF-8, cut to 100 bytes.
fn shown(value: &[u8]) -> String {
    let mut value = String::from_utf8_lossy(&value[..value.len().min(400)]).into_owned();
    if value.len() > 100 {
        let mut cut = 100;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
    }
    value
}

/// The millisecond part of a stream entry id (its enqueue time).
pub fn entry_ms(entry_id: &str) -> u64 {
    entry_id
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobState {
    /// In the stream, not yet delivered to a worker.
    Waiting,
    /// In the delayed set until its due time.
    Scheduled,
    /// Failed an attempt; waiting out its backoff in the delayed set.
    Retrying,
    /// Delivered to a worker that has not started it yet.
    Taken,
    /// Running on a worker.
    Running,
    /// Running, and a producer asked to cancel it.
    Cancelling,
    /// Ended with a result.
    Succeeded,
    /// Ended with an error that is not worth retrying.
    Failed,
    /// Ended in the dead-letter stream (attempts exhausted, malformed, poison).
    Dead,
    /// Ended without starting: its queue timeout passed.
    Expired,
    /// Ended by a cancel.
    Cancelled,
    /// Unknown: never enqueued, or ended longer ago than the retention.
    NotFound,
}

impl JobState {
    /// Parses the state names used in Redis.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "waiting" => Self::Waiting,
            "scheduled" => Self::Scheduled,
            "retrying" => Self::Retrying,
            "taken" => Self::Taken,
            "running" => Self::Running,
            "cancelling" => Self::Cancelling,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            "not_found" => Self::NotFound,
            _ => return None,
        })
    }

    /// The name used in Redis and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Scheduled => "scheduled",
            Self::Retrying => "retrying",
            Self::Taken => "taken",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::NotFound => "not_found",
        }
    }

    /// The states a job never leaves (each counted under its name in the stats hash).
    pub const TERMINAL: [JobState; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::Dead,
        Self::Expired,
        Self::Cancelled,
    ];

    /// True for the states a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Dead | Self::Expired | Self::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a producer may know about a job (the reply of `fleetq_status`).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct JobStatus {
    /// The job id.
    pub id: String,
    /// Where the job is.
    pub state: JobState,
    /// 1-based place among waiting jobs, when waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Attempts made so far (first run included).
    pub attempts: u32,
    /// Node of the current or last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Nodes of every attempt, in order.
    pub nodes: Vec<String>,
    /// The result JSON, when succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "service", schema(value_type = Option<Object>))]
    pub result: Option<serde_json::Value>,
    /// The last error, when failed, dead, expired or retrying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Latest progress report (JSON), when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "service", schema(value_type = Option<Object>))]
    pub progress: Option<serde_json::Value>,
    /// Every other field of the job hash (timestamps in ms, reason, timeout kind, …).
    pub fields: HashMap<String, String>,
}

impl JobStatus {
    /// Builds a status from the flat field/value reply of `fleetq_status`.
    pub fn from_fields(id: &str, flat: Vec<(String, String)>) -> Self {
        let mut fields: HashMap<String, String> = flat.into_iter().collect();
        let state = fields
            .remove("state")
            .and_then(|s| JobState::from_name(&s))
            .unwrap_or(JobState::NotFound);
        let position = fields.remove("position").and_then(|p| p.parse().ok());
        let attempts = fields
            .get("attempts")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let node = fields.get("node").cloned();
        let nodes = fields
            .get("nodes")
            .map(|n| {
                n.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let json = |v: Option<String>| {
            v.map(|s| serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s)))
        };
        let result = json(fields.remove("result"));
        let progress = json(fields.remove("progress"));
        let error = fields.remove("error");
        Self {
            id: id.to_owned(),
            state,
            position,
            attempts,
            node,
            nodes,
            result,
            error,
            progress,
            fields,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            id: "1700000000000-0".into(),
            fields: fields
                .iter()
                .map(|(f, v)| ((*f).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn the_first_of_two_equal_fields_is_read_as_in_the_functions() {
        let r = raw(&[("payload", "{}"), ("id", "first"), ("id", "second")]);
        assert_eq!(r.job_id(), "first");
        assert_eq!(JobEntry::parse(&r, 1024).unwrap().job_id, "first");
    }

    #[test]
    fn a_field_name_that_is_not_utf8_is_malformed() {
        let r = RawEntry::from_bytes(
            "1-0".into(),
            vec![
                (b"payload".to_vec(), b"{}".to_vec()),
                (b"\xff\xfe".to_vec(), b"x".to_vec()),
            ],
        );
        let e = JobEntry::parse(&r, 1024).unwrap_err();
        assert!(matches!(e, Malformed::FieldNameNotUtf8(_)), "{e}");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    #[test]
    fn avoid_is_checked_as_documented() {
        let ok = raw(&[("payload", "{}"), ("avoid", "gpu-1,gpu-2")]);
        assert_eq!(
            JobEntry::parse(&ok, 1024).unwrap().avoid,
            ["gpu-1", "gpu-2"]
        );
        let long = "n,".repeat(5000);
        for bad in [long.as_str(), "a b", "x,{y}"] {
            let e = JobEntry::parse(&raw(&[("payload", "{}"), ("avoid", bad)]), 1024);
            assert!(
                matches!(&e, Err(Malformed::BadField { field, .. }) if field == "avoid"),
                "{bad}: {e:?}"
            );
        }
        let r = RawEntry::from_bytes(
            "1-0".into(),
            vec![
                (b"payload".to_vec(), b"{}".to_vec()),
                (b"avoid".to_vec(), b"\xff".to_vec()),
            ],
        );
        assert!(JobEntry::parse(&r, 1024).is_err());
    }

    #[test]
    fn a_payload_alone_is_a_job() {
        let j = JobEntry::parse(&raw(&[("payload", r#"{"a":1}"#)]), 1024).unwrap();
        assert_eq!(j.job_id, "1700000000000-0");
        assert_eq!(j.enqueued_ms, 1_700_000_000_000);
        assert_eq!(j.payload["a"], 1);
        assert_eq!(j.prior_attempts, 0);
    }

    #[test]
    fn each_malformation_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("data", "{}")], "no payload"),
            (&[("payload", "{nope")], "not valid JSON"),
            (&[("payload", &"1".repeat(2000))], "over the queue limit"),
            (
                &[("payload", "{}"), ("max_attempts", "many")],
                "max_attempts",
            ),
            (
                &[("payload", "{}"), ("run_timeout_ms", "0")],
                "run_timeout_ms",
            ),
        ];
        for (fields, want) in cases {
            let err = JobEntry::parse(&raw(fields), 1024).unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn numbers_out_of_range_are_refused_naming_field_value_and_range() {
        for (field, value) in [
            ("queue_timeout_ms", "18446744073709551615"),
            ("attempts", "4294967296"),
            ("max_attempts", "0"),
            ("max_attempts", "1000001"),
            ("passes", "-1"),
            ("enqueued_ms", "1.5"),
            ("avoid_until", "inf"),
            ("run_timeout_ms", "nan"),
            ("start_timeout_ms", " 5"),
            ("progress_timeout_ms", "+5"),
            ("seq", "0x10"),
            ("attempts", "1e3"),
        ] {
            let e = JobEntry::parse(&raw(&[("payload", "{}"), (field, value)]), 1024).unwrap_err();
            let f = limits::entry_field(field);
            let text = e.to_string();
            assert!(matches!(&e, Malformed::BadNumber { .. }), "{text}");
            let range = format!("from {} to {}", f.min, f.max);
            assert!(
                text.contains(field) && text.contains(value) && text.contains(&range),
                "{text}"
            );
        }
        let ok = raw(&[
            ("payload", "{}"),
            ("attempts", "2"),
            ("max_attempts", "1000000"),
        ]);
        let j = JobEntry::parse(&ok, 1024).unwrap();
        assert_eq!(
            (j.prior_attempts, j.limits.max_attempts),
            (2, Some(1_000_000))
        );
    }

    #[test]
    fn an_entry_of_too_many_fields_is_malformed_whatever_its_payload() {
        let names: Vec<String> = (0..5000).map(|i| format!("f{i}")).collect();
        let mut fields = vec![("payload", "{}")];
        fields.extend(names.iter().map(|n| (n.as_str(), "x")));
        let e = JobEntry::parse(&raw(&fields), 1024).unwrap_err();
        assert!(e.to_string().contains("5001 fields"), "{e}");
        fields.truncate(ENTRY_FIELDS_MAX);
        assert!(JobEntry::parse(&raw(&fields), 1024).is_ok());
    }

    #[test]
    fn the_producer_check_agrees_with_the_worker_parse() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let (deep, edge, over) = (nest(200), nest(127), nest(128));
        // serde_json's nesting limit, as the worker meets it.
        assert!(check_payload(&edge).is_ok() && check_payload(&over).is_err());
        let cases = [
            r#"{"a":[1,2,{"b":null}]}"#,
            "1",
            r#""text""#,
            "{nope",
            "",
            r#"{"a":1} trailing"#,
            r#""bad \q escape""#,
            "\"raw\u{1}control\"",
            "1e400",
            "[1, 2,]",
            &deep,
            &edge,
            &over,
        ];
        for payload in cases {
            let worker = JobEntry::parse(&raw(&[("payload", payload)]), 1 << 20).map(|_| ());
            let producer = check_payload(payload);
            assert_eq!(
                producer.is_ok(),
                worker.is_ok(),
                "{payload:?}: {producer:?} vs {worker:?}"
            );
            if let Err(e) = producer {
                assert!(e.to_string().contains("payload is not valid JSON"), "{e}");
            }
        }
    }

    #[test]
    fn status_parses_result_json() {
        let s = JobStatus::from_fields(
            "j1",
            vec![
                ("state".into(), "succeeded".into()),
                ("result".into(), r#"{"ok":true}"#.into()),
                ("nodes".into(), "a,b".into()),
                ("attempts".into(), "2".into()),
            ],
        );
        assert_eq!(s.state, JobState::Succeeded);
        assert_eq!(s.result.unwrap()["ok"], true);
        assert_eq!(s.nodes, vec!["a", "b"]);
        assert_eq!(s.attempts, 2);
    }
}
