//! The job payload of every throughput, memory and latency scenario: a JSON text of exactly
//! [`crate::plan::PAYLOAD_BYTES`] bytes that the bench worker treats as a no-op.

/// A JSON object of exactly `bytes` bytes (at least 16): `{"prompt":"aaa…"}`. It has no
/// `sleep_ms` field, so the bench worker succeeds at once.
pub fn noop(bytes: usize) -> String {
    const HEAD: &str = r#"{"prompt":""#;
    const TAIL: &str = r#""}"#;
    let fill = bytes.saturating_sub(HEAD.len() + TAIL.len()).max(1);
    format!("{HEAD}{}{TAIL}", "a".repeat(fill))
}

/// A payload that keeps the bench worker busy for `ms` milliseconds (the recovery scenarios).
pub fn sleep(ms: u64) -> String {
    serde_json::json!({ "sleep_ms": ms }).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn noop_has_the_exact_size_and_is_json() {
        let p = noop(200);
        assert_eq!(p.len(), 200);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert!(v.get("sleep_ms").is_none());
    }
}
