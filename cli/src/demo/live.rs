//! What the demo shows while it runs.
//!
//! On a terminal: the header line, then one bar for the burst and one line per node, redrawn
//! in place; they are cleared when the jobs have ended, so that the summary follows the
//! header. Anything else (a pipe, a file): the header and a line at each quarter of the jobs,
//! with no cursor movement or clearing codes. Nothing else writes to stdout meanwhile (the
//! services log to the demo's log file).

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetq_broker::inspect;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::FLEET;
use crate::output::human_secs;

/// How the demo shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum View {
    /// Live bars (stdout is a terminal).
    Bars,
    /// A few plain lines (stdout is a pipe or a file).
    Lines,
    /// Nothing (`--json`, `--quiet`).
    Off,
}

/// Whether stdout is a terminal (the live bars draw there).
pub(super) fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Event types that end a job.
const ENDS: [&str; 5] = ["succeeded", "failed", "dead", "expired", "cancelled"];

/// The live view.
pub(super) struct Ui {
    view: View,
    jobs: usize,
    started: Instant,
    /// Jobs ended so far (by their events).
    ended: AtomicUsize,
    /// Quarters of the burst already told (plain lines).
    told: AtomicUsize,
    bars: Option<Bars>,
    /// Nodes whose host died: their line keeps saying so.
    dead: Mutex<HashSet<String>>,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    nodes: HashMap<String, ProgressBar>,
}

impl Ui {
    /// Prints `header` and starts the view for a burst of `jobs`.
    pub(super) fn new(view: View, header: &str, jobs: usize) -> Self {
        if view != View::Off {
            // Before any bar exists: the bars draw below it and never over it.
            println!("{header}");
        }
        let bars = (view == View::Bars).then(|| Bars::new(jobs));
        Self {
            view,
            jobs,
            started: Instant::now(),
            ended: AtomicUsize::new(0),
            told: AtomicUsize::new(0),
            bars,
            dead: Mutex::default(),
        }
    }

    /// Shows one event of the queue.
    pub(super) fn event(&self, f: &HashMap<String, String>) {
        let get = |k: &str| f.get(k).map_or("", String::as_str);
        let kind = get("type");
        if ENDS.contains(&kind) {
            let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
            self.ended_so_far(ended);
        }
        let Some(bars) = &self.bars else {
            return;
        };
        let Some(pb) = bars.nodes.get(get("node")) else {
            return;
        };
        let job = get("job");
        let short = job.get(job.len().saturating_sub(6)..).unwrap_or(job);
        if self.is_dead(get("node")) {
            if kind == "timeout" {
                pb.set_message(format!(
                    "HOST DIED · job …{short}: {} timeout, back in line",
                    get("kind")
                ));
            }
            return;
        }
        match kind {
            "started" | "taken" => pb.set_message(format!("job …{short} started")),
            "progress" => {
                let p: serde_json::Value =
                    serde_json::from_str(get("progress")).unwrap_or_default();
                pb.set_message(format!(
                    "job …{short} {} {}/{}",
                    p["stage"].as_str().unwrap_or(""),
                    p["step"],
                    p["total"]
                ));
            }
            "succeeded" => pb.set_message(format!("job …{short} done")),
            "retrying" => pb.set_message(format!(
                "job …{short} failed: {}",
                get("error").chars().take(50).collect::<String>()
            )),
            "timeout" => pb.set_message(format!("job …{short} {} timeout", get("kind"))),
            "node_suspended" => pb.set_message(format!("SUSPENDED: {}", get("reason"))),
            _ => {}
        }
    }

    fn ended_so_far(&self, ended: usize) {
        if let Some(bars) = &self.bars {
            bars.total.set_position(ended as u64);
        }
        if self.view != View::Lines || self.jobs == 0 {
            return;
        }
        let quarter = ended * 4 / self.jobs;
        if quarter > self.told.fetch_max(quarter, Ordering::Relaxed) {
            println!(
                "  {ended}/{} jobs ended after {}",
                self.jobs,
                human_secs(self.started.elapsed().as_secs_f64())
            );
        }
    }

    fn is_dead(&self, node: &str) -> bool {
        self.dead.lock().is_ok_and(|d| d.contains(node))
    }

    /// The host of `node` died.
    pub(super) fn node_dead(&self, node: &str) {
        if let Ok(mut d) = self.dead.lock() {
            d.insert(node.to_owned());
        }
        if let Some(pb) = self.bars.as_ref().and_then(|b| b.nodes.get(node)) {
            pb.set_message("HOST DIED with its job in hand".to_owned());
        }
    }

    /// Shows the queue's depths.
    pub(super) fn depth(&self, st: &inspect::QueueState) {
        if let Some(bars) = &self.bars {
            bars.total.set_message(format!(
                "waiting {} · in flight {} · delayed {}",
                st.waiting, st.in_flight, st.delayed
            ));
        }
    }

    /// The jobs have ended; the fleet stops.
    pub(super) fn stopping(&self) {
        if let Some(bars) = &self.bars {
            for pb in bars.nodes.values() {
                pb.finish_and_clear();
            }
            bars.total.set_message("stopping the fleet…");
        }
    }

    /// Clears the view: what follows is the summary.
    pub(super) fn finish(&self) {
        if let Some(bars) = &self.bars {
            for pb in bars.nodes.values() {
                pb.finish_and_clear();
            }
            bars.total.finish_and_clear();
            let _ = bars.multi.clear();
        }
    }
}

impl Bars {
    fn new(jobs: usize) -> Self {
        // Hidden while the bars are put together, so that nothing half-built is drawn.
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let total = multi.add(ProgressBar::new(jobs as u64));
        total.set_style(
            ProgressStyle::with_template("jobs   [{bar:30}] {pos}/{len} {elapsed}  {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let mut nodes = HashMap::new();
        for spec in FLEET {
            let pb = multi.add(ProgressBar::new_spinner());
            pb.set_style(
                ProgressStyle::with_template("{spinner} {prefix:6} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.set_prefix(spec.name);
            pb.set_message(format!("idle ({})", spec.role));
            nodes.insert(spec.name.to_owned(), pb);
        }
        multi.set_draw_target(ProgressDrawTarget::stdout());
        for pb in nodes.values() {
            pb.enable_steady_tick(Duration::from_millis(120));
        }
        Self {
            multi,
            total,
            nodes,
        }
    }
}
