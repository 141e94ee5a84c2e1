//! The Python child helper's own unit tests (examples/python), run with the suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn python_child_helper_unit_tests_pass() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-q", "test_fleetq_child"])
        .current_dir(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is needed for the examples' tests");
    assert!(
        out.status.success(),
        "python unit tests failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
