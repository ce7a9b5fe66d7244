//! `cogrelay jobs` and `cogrelay queue stats`, the real binary on both backends,
//! with a relay running and without one.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

pub(crate) struct Out {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|_| panic!("not JSON: {}\n{}", self.stdout, self.stderr))
    }
}

/// The real binary with `args`, on the app's store (its data directory, or
/// its Redis).
pub(crate) async fn cli(app: &TestApp, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    match &app.redis {
        Some(r) => cmd.env("COGRELAY_QUEUE", "redis").env("REDIS_URL", r.url()),
        None => cmd.env("COGRELAY_DATA_DIR", &app.data_dir),
    };
    let out = cmd.output().await.expect("run cogrelay");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

both_backends! {
    async fn jobs_commands_inspect_retry_and_remove(b: Backend) {
        let mut app = spawn_app_on(b, |c| c.delivery.attempts = 1).await;
        app.sink.set_default(Behaviour::status(500));
        for i in 0..3 {
            app.post_event(&event("bot", &format!("cli-{i}"))).await;
        }
        app.wait_counts(Duration::from_secs(15), |c| c["failed"] == 3).await;

        let list = cli(&app, &["jobs", "list", "--state", "failed", "--limit", "2", "--json"]).await;
        assert_eq!(list.code, 0, "{}", list.stderr);
        let v = list.json();
        assert_eq!(v["total"], 3);
        assert_eq!(v["items"].as_array().expect("items").len(), 2);
        assert_eq!(v["items"][0]["attempts"][0]["status"], 500);
        let ids: Vec<String> = cli(&app, &["jobs", "list", "--state", "failed", "--json"]).await.json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_string())
            .collect();

        let table = cli(&app, &["jobs", "list", "--state", "failed", "--limit", "2"]).await;
        assert!(table.stdout.starts_with("ID"), "{}", table.stdout);
        // Each row says whose job it is and what event: two destinations'
        // jobs of one event look different.
        let header: Vec<&str> = table.stdout.lines().next().expect("header").split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert!(header.contains(&"DESTINATION") && header.contains(&"TYPE"), "{header:?}");
        let row = table.stdout.lines().nth(1).expect("row");
        assert!(row.contains(" default ") && row.contains("message.received"), "{row}");
        assert!(table.stdout.contains("HTTP 500") && table.stdout.contains("1-2 of 3; next page: --offset 2"), "{}", table.stdout);

        let show = cli(&app, &["jobs", "show", &ids[0], "--json"]).await;
        assert_eq!(show.json()["payload"]["n"], 1);
        let shown = cli(&app, &["jobs", "show", &ids[0]]).await;
        assert!(shown.stdout.contains("state       failed") && shown.stdout.contains("\"n\": 1"), "{}", shown.stdout);
        assert!(shown.stdout.contains("destination default") && shown.stdout.contains("type        message.received"), "{}", shown.stdout);

        // A retry without an id says what to give instead.
        let bare = cli(&app, &["jobs", "retry"]).await;
        assert_eq!(bare.code, 2);
        assert!(bare.stderr.contains("--all-failed"), "{}", bare.stderr);

        let stats = cli(&app, &["queue", "stats", "--json"]).await;
        assert_eq!(stats.json()["failed"], 3);
        assert!(cli(&app, &["queue", "stats"]).await.stdout.contains("failed     3"));

        // Retry one, then all, with the relay running: delivered.
        app.sink.set_default(Behaviour::status(200));
        let one = cli(&app, &["jobs", "retry", &ids[0]]).await;
        assert_eq!(one.code, 0, "{}", one.stderr);
        assert!(one.stdout.contains("waiting again"));
        let all = cli(&app, &["jobs", "retry", "--all-failed", "--json"]).await;
        assert_eq!(all.json()["retried"], 2);
        app.wait_counts(Duration::from_secs(15), |c| c["completed"] == 3 && c["failed"] == 0).await;

        // Bad ids and arguments: one clear line; exit 2 a bad argument, 3 no
        // such job, 4 a state that does not allow it (delivered: not failed).
        for (args, code) in [(vec!["jobs", "show", "999999"], 3), (vec!["jobs", "list", "--limit", "0"], 2), (vec!["jobs", "list", "--state", "lost"], 2), (vec!["jobs", "retry", &ids[0]], 4), (vec!["jobs", "retry", "999999"], 3)] {
            let out = cli(&app, &args).await;
            assert_eq!(out.code, code, "{args:?}: {}", out.stderr);
            assert_eq!(out.stderr.trim().lines().count(), 1, "{args:?}: {}", out.stderr);
        }

        // Without a relay running.
        app.stop().await.expect("stop");
        let removed = cli(&app, &["jobs", "remove", &ids[1], "--json"]).await;
        assert_eq!(removed.code, 0, "{}", removed.stderr);
        assert_eq!(cli(&app, &["jobs", "show", &ids[1]]).await.code, 3);
        let stats = cli(&app, &["queue", "stats", "--json"]).await;
        assert_eq!(stats.json()["completed"], 2);
    }
}

/// What the store holds, as bytes: the embedded file and its WAL (not the
/// shared-memory index a reader may touch); on Redis, the writing commands
/// it has run since its statistics were reset.
fn store_writes(app: &TestApp) -> String {
    match &app.redis {
        Some(r) => {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &r.port.to_string(), "INFO", "commandstats"])
                .output()
                .expect("redis-cli");
            const WRITES: [&str; 18] = [
                "set", "del", "hset", "hmset", "hdel", "hincrby", "lpush", "rpush", "lrem", "zadd",
                "zrem", "sadd", "srem", "incr", "xadd", "pexpire", "eval", "evalsha",
            ];
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    l.strip_prefix("cmdstat_")
                        .and_then(|c| c.split(':').next())
                        .is_some_and(|c| WRITES.contains(&c))
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        }
        None => ["cogrelay.db", "cogrelay.db-wal"]
            .iter()
            .map(|f| {
                let bytes = std::fs::read(app.data_dir.join(f)).unwrap_or_default();
                format!(
                    "{f}: {} bytes, sum {}",
                    bytes.len(),
                    bytes.iter().map(|b| u64::from(*b)).sum::<u64>()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

both_backends! {
    /// Operators' reads never write (SPEC §7): every reading command, run
    /// against the queue (no relay), leaves it as it was; a pause of a name
    /// nobody has is exit 3 and stores nothing; and a reader that goes away
    /// (`| head`) ends the output quietly (on 27e726d: `queue stats` wrote a
    /// key on Redis, a listing of waiting jobs wrote out every bundle, and a
    /// broken pipe panicked).
    async fn reading_commands_write_nothing_and_a_closed_pipe_ends_quietly(b: Backend) {
        let mut app = spawn_app_on(b, |c| {
            c.delivery.attempts = 1;
            c.store.retention.remove_on_complete = 10_000;
        })
        .await;
        app.sink.set_default(Behaviour::status(500));
        for i in 0..3 {
            app.post_event(&event("bot", &format!("r-{i}"))).await;
        }
        app.wait_counts(Duration::from_secs(15), |c| c["failed"] == 3).await;
        let (status, _) = (app.admin_post("/admin/destinations/default/pause").await.status, ());
        assert_eq!(status, 200);
        for i in 0..600 {
            app.post_event(&event("bot", &format!("w-{i}"))).await;
        }
        app.stop().await.expect("stop");
        if let Some(r) = &app.redis {
            assert!(r.command("CONFIG RESETSTAT"));
        }
        let before = store_writes(&app);
        for args in [
            vec!["queue", "stats"],
            vec!["jobs", "list"],
            vec!["jobs", "list", "--state", "waiting", "--limit", "500"],
            vec!["jobs", "list", "--state", "failed", "--json"],
            vec!["jobs", "show", "1"],
            vec!["destinations", "list"],
            vec!["jobs", "list", "--destination", "default"],
        ] {
            let out = cli(&app, &args).await;
            assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        }
        let nosuch = cli(&app, &["destinations", "pause", "nosuch"]).await;
        assert_eq!(nosuch.code, 3, "{}", nosuch.stderr);
        // No file read: where a destination without jobs would be known from.
        assert!(nosuch.stderr.contains("COGRELAY_CONFIG"), "{}", nosuch.stderr);
        assert_eq!(store_writes(&app), before, "a reading command wrote to the store");
        let listed = cli(&app, &["destinations", "list", "--json"]).await.json();
        assert_eq!(listed.as_array().expect("list").len(), 1, "no phantom row: {listed}");

        // 500 jobs listed into a pipe its reader closes after one byte.
        let out = in_shell(&app, "jobs list --state waiting --limit 500 | head -c 1 >/dev/null");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.trim().is_empty(), "quiet: {stderr}");

        // Output that cannot be written (a full disk) is an error, exit 1,
        // not a success a script would trust (it exited 0).
        for args in ["jobs list --json", "queue stats", "destinations list", "--help"] {
            let out = in_shell(&app, &format!("{args} >/dev/full"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args}: {stderr}");
            assert!(stderr.contains("cannot write the output"), "{args}: {stderr}");
        }
    }
}

/// `cogrelay <line>` run by `sh -c` (for its pipes and redirections) on
/// `app`'s queue.
fn in_shell(app: &TestApp, line: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{} {line}", env!("CARGO_BIN_EXE_cogrelay")));
    match &app.redis {
        Some(r) => cmd.env("COGRELAY_QUEUE", "redis").env("REDIS_URL", r.url()),
        None => cmd.env("COGRELAY_DATA_DIR", &app.data_dir),
    };
    cmd.output().expect("sh")
}
