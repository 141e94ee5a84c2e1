//! Output for people (tables) and for scripts (`--json`: one JSON document on stdout).

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

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
        Ok(s) => println!("{s}"),
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

#[cfg(test)]
mod tests {
    use super::human_secs;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(12.34), "12.3 s");
        assert_eq!(human_secs(250.0), "4 m 10 s");
        assert_eq!(human_secs(7500.0), "2 h 5 m");
    }
}
