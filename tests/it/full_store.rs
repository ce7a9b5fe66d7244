//! A full store keeps delivering and drains (SPEC §7, docs/guarantees.md):
//! at `COGRELAY_MAX_DB_BYTES` and on a real full disk (a small tmpfs the
//! test mounts), with one destination and with fan-out. The store refuses
//! new events with 503 while it is full, and everything it acknowledged is
//! delivered once the destinations are resumed; then it accepts again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(120);

/// A tmpfs of `size` mounted on a fresh directory for the life of the value
/// (root only: skipped with a printed reason elsewhere, failed under CI=true).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs (root is needed), and CI=true requires this test"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs (the full-disk tests need root)");
            return None;
        }
        Some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A relay on `data_dir` with destinations `a`, `b`, `c` (each its own
/// target) or the one `default`, all paused.
async fn paused_relay(
    data_dir: PathBuf,
    fan_out: bool,
    max_db_bytes: u64,
) -> (TestApp, Vec<Sink>, Vec<&'static str>) {
    let names: Vec<&'static str> = if fan_out {
        vec!["a", "b", "c"]
    } else {
        vec!["default"]
    };
    let mut sinks = Vec::new();
    for _ in 1..names.len() {
        sinks.push(Sink::start().await.expect("sink"));
    }
    let urls: Vec<String> = sinks.iter().map(Sink::url).collect();
    let file_names = names.clone();
    let app = spawn_app_with(move |c| {
        c.store.data_dir = data_dir;
        c.store.max_db_bytes = max_db_bytes;
        c.store.fsync = cogrelay::config::Fsync::Off;
        if fan_out {
            let mut all = vec![c.delivery.target.to_string()];
            all.extend(urls);
            let text: String = file_names
                .iter()
                .zip(&all)
                .map(|(n, u)| format!("[[destination]]\nname = \"{n}\"\nurl = \"{u}\"\n"))
                .collect();
            c.destinations_file = Some(destinations_of(c, &text));
        }
    })
    .await;
    for n in &names {
        let r = app
            .admin_post(&format!("/admin/destinations/{n}/pause"))
            .await;
        assert_eq!(r.status, 200, "pause {n}: {}", r.json);
    }
    let mut all = vec![app.sink.clone()];
    all.extend(sinks);
    (app, all, names)
}

/// Resumes every destination and waits until each target got every
/// accepted event once; then a new event is accepted again.
async fn drains(app: Arc<TestApp>, sinks: &[Sink], names: &[&str], accepted: &BTreeSet<String>) {
    for n in names {
        let r = app
            .admin_post(&format!("/admin/destinations/{n}/resume"))
            .await;
        assert_eq!(r.status, 200, "resume {n}");
    }
    for (sink, name) in sinks.iter().zip(names) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let got: BTreeSet<String> = sink
                .received()
                .iter()
                .filter_map(|r| r.header("x-event-id").map(str::to_string))
                .collect();
            if &got == accepted {
                break;
            }
            let q = app.admin_get("/admin/queue").await.json;
            assert!(
                std::time::Instant::now() < deadline,
                "{name} got {} of {} accepted events; queue {q}",
                got.len(),
                accepted.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(sink.posts(), accepted.len(), "{name}: each event once");
    }
    // Drained: new events are accepted again.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = app.post_event(&event("bot", "after-the-drain")).await;
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refusing after the drain: {}",
            r.json
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut app = Arc::into_inner(app).expect("one owner");
    app.stop().await.expect("clean stop");
}

async fn full_then_drained(data_dir: PathBuf, fan_out: bool, max_db_bytes: u64) {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("cogrelay=debug")
            .try_init();
    }
    let (app, sinks, names) = paused_relay(data_dir, fan_out, max_db_bytes).await;
    let app = Arc::new(app);
    let accepted = fill_until_refused(&app, 16, 40).await;
    drains(app, &sinks, &names, &accepted).await;
}

/// At `COGRELAY_MAX_DB_BYTES`, three destinations, all paused: every event
/// is one bundle row, whose other jobs a claim must write out. Refused at
/// the cap, it drains once resumed (on 27e726d: "store is full" every
/// second and nothing delivered, even after a restart).
#[tokio::test]
async fn a_store_at_its_cap_with_fan_out_drains() {
    let tmp = tempfile::tempdir().expect("tmp");
    full_then_drained(tmp.path().join("data"), true, 4 * 1024 * 1024).await;
}

/// A real full disk (a 6 MB tmpfs), one destination paused: a claim must
/// write before it delivers (on 27e726d: "cannot claim jobs … the store is
/// full" every second, nothing delivered).
#[tokio::test]
async fn a_full_disk_keeps_delivering_and_drains() {
    let Some(fs) = Tmpfs::mount("6m") else {
        return;
    };
    full_then_drained(fs.path().join("data"), false, 0).await;
}

/// The same disk with fan-out: three destinations, all paused.
#[tokio::test]
async fn a_full_disk_with_fan_out_keeps_delivering_and_drains() {
    let Some(fs) = Tmpfs::mount("6m") else {
        return;
    };
    full_then_drained(fs.path().join("data"), true, 0).await;
}
