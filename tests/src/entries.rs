//! Random stream entries from a seed, as a careless or hostile foreign producer would `XADD`
//! them: random bytes in names and values, 1 to 6000 fields (Redis refuses an entry of none),
//! values up to about 1 MB, duplicate fields, numbers out of range or of the wrong type, no
//! payload — and good jobs to interleave with them.
//!
//! The shapes are chosen so that every entry can end within seconds on one worker: the numbers
//! that are valid are small (a valid `max_attempts` of a million with a 1 ms run timeout would
//! retry for days), and every job id is unique or not a valid id at all (so the entry id is
//! the job id), so each entry is one job to account for.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Raw fields of one entry, in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The numeric fields of an entry (see `fleetq_broker::limits::ENTRY_NUMBERS`).
const NUMBER_FIELDS: &[&str] = &[
    "max_attempts",
    "queue_timeout_ms",
    "start_timeout_ms",
    "progress_timeout_ms",
    "run_timeout_ms",
    "attempts",
    "enqueued_ms",
    "avoid_until",
    "passes",
    "seq",
];

/// Text fields of an entry.
const TEXT_FIELDS: &[&str] = &["id", "workflow", "traceparent", "avoid"];

/// Values that are not numbers by the rule, or out of every field's range.
const BAD_NUMBERS: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-1",
    "1.5",
    "0x10",
    "1e3",
    " 5",
    "+5",
    "",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "99999999999999999999999",
    "00000000000000000001",
];

/// Valid payloads without any instruction to the test worker (no `sleep_ms`, `fail`, …).
const GOOD_PAYLOADS: &[&str] = &[
    "{}",
    "[]",
    "\"text\"",
    "1",
    "null",
    "{\"k\":[1,2,{\"x\":null}]}",
];

/// Bad payloads.
const BAD_PAYLOADS: &[&[u8]] = &[
    b"",
    b"{",
    b"{not json",
    b"\xff\xfe",
    b"[1,",
    b"nul",
    b"{\"a\":}",
];

/// About the largest entry made, in bytes.
const MAX_ENTRY_BYTES: usize = 1_200_000;

/// A seeded source of entries.
pub struct EntryGen {
    rng: StdRng,
    /// Entries made so far, to make job ids unique.
    made: u64,
}

impl EntryGen {
    /// A generator that makes the same entries for the same seed.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            made: 0,
        }
    }

    /// A good job: a JSON payload and a unique id `good-<n>`; it must succeed.
    pub fn good(&mut self) -> (String, Fields) {
        self.made += 1;
        let id = format!("good-{}", self.made);
        let payload = format!("{{\"good\":{}}}", self.made);
        (
            id.clone(),
            vec![
                (b"payload".to_vec(), payload.into_bytes()),
                (b"id".to_vec(), id.into_bytes()),
            ],
        )
    }

    /// An entry of random shape; it may happen to be a valid job.
    pub fn hostile(&mut self) -> Fields {
        self.made += 1;
        let count = match self.rng.random_range(0..100) {
            0..=79 => self.rng.random_range(1..12),
            80..=91 => self.rng.random_range(95..110),
            _ => self.rng.random_range(1000..=6000),
        };
        let mut fields = Fields::with_capacity(count);
        if self.rng.random_bool(0.8) {
            fields.push((b"payload".to_vec(), self.payload()));
        }
        let mut size: usize = fields.iter().map(|(f, v)| f.len() + v.len()).sum();
        while fields.len() < count {
            let field = match self.rng.random_range(0..10) {
                0..=3 => self.number_field(),
                4..=5 => self.text_field(),
                6 if !fields.is_empty() => {
                    // A duplicate of a field already there, with another value.
                    let name = fields[self.rng.random_range(0..fields.len())].0.clone();
                    let value = self.random_bytes(0..20);
                    (name, value)
                }
                _ => (
                    self.random_name(),
                    self.random_value(MAX_ENTRY_BYTES.saturating_sub(size)),
                ),
            };
            // About 1 MB at most in all: a field past that keeps its name, not its value.
            let (name, mut value) = field;
            if size + name.len() + value.len() > MAX_ENTRY_BYTES {
                value.clear();
            }
            size += name.len() + value.len();
            fields.push((name, value));
        }
        fields
    }

    fn payload(&mut self) -> Vec<u8> {
        match self.rng.random_range(0..100) {
            0..=49 => GOOD_PAYLOADS[self.rng.random_range(0..GOOD_PAYLOADS.len())]
                .as_bytes()
                .to_vec(),
            50..=84 => BAD_PAYLOADS[self.rng.random_range(0..BAD_PAYLOADS.len())].to_vec(),
            85..=96 => self.random_bytes(0..200),
            // Large: up to about 1 MB, JSON or not (the queue's limit is 1 MiB).
            _ => {
                let n = self.rng.random_range(100_000..1_100_000);
                if self.rng.random_bool(0.5) {
                    format!("{{\"blob\":\"{}\"}}", "x".repeat(n)).into_bytes()
                } else {
                    vec![b'{'; n]
                }
            }
        }
    }

    fn number_field(&mut self) -> (Vec<u8>, Vec<u8>) {
        let name = NUMBER_FIELDS[self.rng.random_range(0..NUMBER_FIELDS.len())];
        let value = match self.rng.random_range(0..10) {
            0..=5 => BAD_NUMBERS[self.rng.random_range(0..BAD_NUMBERS.len())].to_owned(),
            6 => self.random_digits(),
            _ => self.small_valid(name),
        };
        (name.as_bytes().to_vec(), value.into_bytes())
    }

    /// A value in the field's range that lets the job end quickly.
    fn small_valid(&mut self, name: &str) -> String {
        match name {
            "max_attempts" => self.rng.random_range(1..=3).to_string(),
            "attempts" | "passes" => self.rng.random_range(0..=4).to_string(),
            "enqueued_ms" | "avoid_until" => ["0", "1000", "1700000000000", "4000000000000"]
                [self.rng.random_range(0..4)]
            .to_owned(),
            "seq" => self.rng.random_range(0..1_000_000u64).to_string(),
            // The timeouts: a few ms (they fire at once) or long (they never do).
            _ => ["1", "5", "600000"][self.rng.random_range(0..3)].to_owned(),
        }
    }

    fn random_digits(&mut self) -> String {
        let n = self.rng.random_range(1..25);
        (0..n)
            .map(|_| char::from(b'0' + self.rng.random_range(0..10u8)))
            .collect()
    }

    fn text_field(&mut self) -> (Vec<u8>, Vec<u8>) {
        let name = TEXT_FIELDS[self.rng.random_range(0..TEXT_FIELDS.len())];
        let value = match (name, self.rng.random_range(0..4)) {
            // An id is unique, or no valid id at all (then the entry id is the job id).
            ("id", 0) => format!("h-{}", self.made).into_bytes(),
            ("id", 1) => Vec::new(),
            ("id", 2) => vec![b'i'; 201 + self.rng.random_range(0..500)],
            ("id", _) => {
                let mut v = self.random_bytes(0..20);
                v.push(0xff);
                v
            }
            ("avoid", 0) => b"n1".to_vec(),
            ("avoid", 1) => "n,".repeat(self.rng.random_range(1..3000)).into_bytes(),
            (_, 0) => vec![b'w'; self.rng.random_range(0..400)],
            _ => self.random_bytes(0..40),
        };
        (name.as_bytes().to_vec(), value)
    }

    /// A value of random bytes: mostly short, now and then up to 1 MB (within `room`).
    fn random_value(&mut self, room: usize) -> Vec<u8> {
        if room > 100_000 && self.rng.random_range(0..200) == 0 {
            return self.random_bytes(100_000..room.min(1_000_000));
        }
        self.random_bytes(0..40)
    }

    /// A field name: mostly printable ASCII (so the later checks are reached), sometimes any
    /// bytes (not UTF-8, or empty).
    fn random_name(&mut self) -> Vec<u8> {
        if self.rng.random_bool(0.1) {
            return self.random_bytes(0..24);
        }
        let n = self.rng.random_range(1..24);
        (0..n).map(|_| self.rng.random_range(b' '..=b'~')).collect()
    }

    fn random_bytes(&mut self, len: std::ops::Range<usize>) -> Vec<u8> {
        let mut v = vec![0u8; self.rng.random_range(len)];
        self.rng.fill(&mut v[..]);
        v
    }
}
