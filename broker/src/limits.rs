//! Limits: the one rule for every number fleetq reads from a stream entry or a queue config
//! hash, the range of each such field, and the most fields an entry may carry.
//!
//! The rule is the same in Rust ([`whole`]) and in the functions (`whole` in `base.lua`): a
//! number is 1 to [`MAX_DIGITS`] decimal digits and nothing else — no sign, space, point,
//! exponent, `0x`, `nan` or `inf` — within its field's range. Everything else is refused with
//! a message naming the field, the value and the range, never wrapped, saturated or read as a
//! default. The ranges below are the only copy: [`lua_tables`] writes them into the library
//! (`base.lua`), so Rust and Lua cannot drift apart. The bounds keep every sum the functions
//! make (a time plus a timeout) exact in Lua's doubles (below 2⁵³).

use std::ops::RangeInclusive;

/// Most digits a number may have (leading zeros included): 16 digits parse in Rust's `u64`
/// and Lua's doubles alike, and every range below fits.
pub const MAX_DIGITS: usize = 16;

/// Longest duration in a field, ms: 10¹² ms, about 31 years.
pub const MAX_MS: u64 = 1_000_000_000_000;
/// Latest time in a field, ms since the epoch: 10¹³ ms, the year 2286.
pub const MAX_TIME_MS: u64 = 10_000_000_000_000;
/// Most attempts a job may be allowed (and so may have made).
pub const MAX_ATTEMPTS: u64 = 1_000_000;

/// Most fields a stream entry may carry. An entry with more is malformed (dead-lettered with
/// the reason, never run), and the functions refuse to add one.
pub const ENTRY_FIELDS_MAX: usize = 100;

/// A numeric field and its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The field's name in the entry or the config hash.
    pub name: &'static str,
    /// Smallest value allowed.
    pub min: u64,
    /// Largest value allowed.
    pub max: u64,
}

impl Field {
    const fn new(name: &'static str, min: u64, max: u64) -> Self {
        Self { name, min, max }
    }

    /// The range as Rust sees it.
    pub fn range(&self) -> RangeInclusive<u64> {
        self.min..=self.max
    }

    /// What the field must hold, for messages: `a whole number from 1 to 1000000`.
    pub fn expected(&self) -> String {
        format!(
            "a whole number from {} to {} (decimal digits only)",
            self.min, self.max
        )
    }
}

/// The numeric fields of a stream entry (see docs/protocol.md §3).
pub const ENTRY_NUMBERS: &[Field] = &[
    Field::new("max_attempts", 1, MAX_ATTEMPTS),
    Field::new("queue_timeout_ms", 1, MAX_MS),
    Field::new("start_timeout_ms", 1, MAX_MS),
    Field::new("progress_timeout_ms", 1, MAX_MS),
    Field::new("run_timeout_ms", 1, MAX_MS),
    Field::new("attempts", 0, MAX_ATTEMPTS),
    Field::new("enqueued_ms", 0, MAX_TIME_MS),
    Field::new("avoid_until", 0, MAX_TIME_MS),
    Field::new("passes", 0, MAX_ATTEMPTS),
    Field::new("seq", 0, MAX_TIME_MS),
    // Not stored on an entry: an argument of fleetq_enqueue only.
    Field::new("delay_ms", 0, MAX_MS),
];

/// The numeric fields of a queue config hash (see docs/protocol.md §4). For the timeouts,
/// `0` means none; for `retention_ms`, `backoff_base_ms` and `backoff_max_ms` the default.
pub const CONFIG_NUMBERS: &[Field] = &[
    Field::new("lease_ms", 300, 86_400_000),
    Field::new("max_attempts", 0, MAX_ATTEMPTS),
    Field::new("backoff_base_ms", 0, MAX_MS),
    Field::new("backoff_max_ms", 0, MAX_MS),
    Field::new("queue_timeout_ms", 0, MAX_MS),
    Field::new("start_timeout_ms", 0, MAX_MS),
    Field::new("progress_timeout_ms", 0, MAX_MS),
    Field::new("run_timeout_ms", 0, MAX_MS),
    Field::new("retention_ms", 0, MAX_MS),
    Field::new("events_maxlen", 0, 1_000_000_000),
    Field::new("max_payload_bytes", 1, 512 * 1024 * 1024),
    Field::new("failover_cooldown_ms", 0, MAX_MS),
    Field::new("poison_nodes", 0, 1000),
    Field::new("partitions", 0, 64),
    Field::new("routine_events", 0, 1),
];

/// The entry field `name`. Panics for a name not in [`ENTRY_NUMBERS`] (a bug of this crate,
/// caught by its tests).
pub fn entry_field(name: &str) -> Field {
    find(ENTRY_NUMBERS, name)
}

/// The config field `name`. Panics for a name not in [`CONFIG_NUMBERS`] (a bug of this
/// crate, caught by its tests).
pub fn config_field(name: &str) -> Field {
    find(CONFIG_NUMBERS, name)
}

fn find(table: &[Field], name: &str) -> Field {
    #[allow(clippy::expect_used)] // the names are this crate's own constants
    *table
        .iter()
        .find(|f| f.name == name)
        .expect("a field of the limits table")
}

/// A number by the rule (module docs): `raw` is 1 to [`MAX_DIGITS`] ASCII digits and its
/// value lies in `range`; `None` otherwise.
pub fn whole(raw: &[u8], range: RangeInclusive<u64>) -> Option<u64> {
    if raw.is_empty() || raw.len() > MAX_DIGITS || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = raw.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    range.contains(&v).then_some(v)
}

/// The Lua text that `base.lua` receives for its placeholders: (placeholder, text).
pub fn lua_tables() -> Vec<(&'static str, String)> {
    let table = |fields: &[Field]| {
        let rows: Vec<String> = fields
            .iter()
            .map(|f| format!("  {} = {{ {}, {} }},", f.name, f.min, f.max))
            .collect();
        format!("{{\n{}\n}}", rows.join("\n"))
    };
    vec![
        ("__FLEETQ_ENTRY_NUMBERS__", table(ENTRY_NUMBERS)),
        ("__FLEETQ_CONFIG_NUMBERS__", table(CONFIG_NUMBERS)),
        (
            "__FLEETQ_CONFIG_ORDER__",
            format!(
                "{{ {} }}",
                CONFIG_NUMBERS
                    .iter()
                    .map(|f| format!("'{}'", f.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("__FLEETQ_MAX_DIGITS__", MAX_DIGITS.to_string()),
        ("__FLEETQ_ENTRY_FIELDS_MAX__", ENTRY_FIELDS_MAX.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decimal_digits_within_the_range_are_numbers() {
        let r = 1..=1000;
        assert_eq!(whole(b"1", r.clone()), Some(1));
        assert_eq!(whole(b"0007", r.clone()), Some(7));
        assert_eq!(whole(b"1000", r.clone()), Some(1000));
        for bad in [
            &b""[..],
            b"0",
            b"1001",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1.5",
            b"1e3",
            b"0x10",
            b"nan",
            b"inf",
            b"\xff",
            b"00000000000000001",
        ] {
            assert_eq!(
                whole(bad, r.clone()),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The largest 16-digit number neither overflows nor passes.
        assert_eq!(whole(b"9999999999999999", 0..=MAX_TIME_MS), None);
    }

    #[test]
    fn every_sum_the_functions_make_stays_exact_in_a_double() {
        const { assert!(2 * MAX_TIME_MS < 1 << 53) };
        for f in ENTRY_NUMBERS.iter().chain(CONFIG_NUMBERS) {
            assert!(f.min <= f.max && f.max < 1 << 53, "{f:?}");
            assert!(f.max.to_string().len() <= MAX_DIGITS, "{f:?}");
        }
    }

    #[test]
    fn the_lua_tables_hold_every_field() {
        let tables = lua_tables();
        for f in ENTRY_NUMBERS {
            assert!(tables[0]
                .1
                .contains(&format!("{} = {{ {}, {} }}", f.name, f.min, f.max)));
        }
        for f in CONFIG_NUMBERS {
            assert!(tables[1]
                .1
                .contains(&format!("{} = {{ {}, {} }}", f.name, f.min, f.max)));
        }
    }
}
