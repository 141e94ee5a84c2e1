//! Output for people (tables) and for scripts (`--json`: one JSON document on stdout).

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

/// Writes `args` on stdout, then a newline when `newline`. When stdout is closed (a reader
/// such as `head` took what it wanted), the process ends at once with status 0, as other Unix
/// tools do, instead of panicking as `println!` would.
pub fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output to stdout: {e}; check where stdout goes");
            std::process::exit(1)
        }
    }
}

/// `println!` on stdout through [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write_out(format_args!($($arg)*), true) };
}
/// `print!` on stdout through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_out(format_args!($($arg)*), false) };
}
pub(crate) use {out, outln};

/// A table with a header row, in the CLI's style.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// Prints `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("error: cannot encode the output as JSON: {e}"),
    }
}

/// A duration in seconds for people: `850 ms`, `12.3 s`, `4 m 10 s`, `2 h 5 m`.
pub fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{} m {} s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{} h {} m",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}

/// A time (ms since the epoch) for people, in UTC: `2026-12-03 12:07:49.120 UTC`.
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{:03} UTC",
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::{human_secs, utc_time};

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_time(1_718_000_000_120), "2024-06-10 06:13:20.120 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(12.34), "12.3 s");
        assert_eq!(human_secs(250.0), "4 m 10 s");
        assert_eq!(human_secs(7500.0), "2 h 5 m");
    }
}
