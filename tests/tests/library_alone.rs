//! A Rust program that only produces jobs (or inspects queues) depends on the queue library
//! without the broker service: `fleetq-broker = { default-features = false }` brings no HTTP
//! server, metrics registry, OpenAPI or command-line crates. (`./dev test` also builds the
//! library that way before the suite, so a module that needs the service and is not behind
//! its feature fails the test command.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn the_queue_library_alone_has_none_of_the_services_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tree = |features: &[&str]| {
        let out = Command::new(&cargo)
            .args([
                "tree",
                "-p",
                "fleetq-broker",
                "-e",
                "normal",
                "--prefix",
                "none",
            ])
            .args(features)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect::<std::collections::BTreeSet<String>>()
    };
    let service_only = [
        "axum",
        "prometheus",
        "utoipa",
        "hyper",
        "clap",
        "tracing-subscriber",
    ];
    let alone = tree(&["--no-default-features"]);
    assert!(
        alone.contains("redis") && alone.contains("tokio"),
        "{alone:?}"
    );
    for c in service_only {
        assert!(!alone.contains(c), "{c} in the library alone: {alone:?}");
    }
    // The default (the service) has them: the check above looks at the right names.
    let full = tree(&[]);
    for c in service_only {
        assert!(full.contains(c), "{c} missing with the service: {full:?}");
    }
}
