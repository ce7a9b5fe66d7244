//! `cogrelay jobs` and `cogrelay queue stats`, the real binary on both backends,
//! with a relay running and without one.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|_| panic!("not JSON: {}\n{}", self.stdout, self.stderr))
    }
}

async fn cli(app: &TestApp, args: &[&str]) -> Out {
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
        assert!(table.stdout.contains("HTTP 500") && table.stdout.contains("1-2 of 3; next page: --offset 2"), "{}", table.stdout);

        let show = cli(&app, &["jobs", "show", &ids[0], "--json"]).await;
        assert_eq!(show.json()["payload"]["n"], 1);
        let shown = cli(&app, &["jobs", "show", &ids[0]]).await;
        assert!(shown.stdout.contains("state      failed") && shown.stdout.contains("\"n\": 1"), "{}", shown.stdout);

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

        // Bad ids and arguments: one clear line, exit 2.
        for args in [vec!["jobs", "show", "999999"], vec!["jobs", "list", "--limit", "0"], vec!["jobs", "list", "--state", "lost"], vec!["jobs", "retry", &ids[0]]] {
            let out = cli(&app, &args).await;
            assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
            assert_eq!(out.stderr.trim().lines().count(), 1, "{args:?}: {}", out.stderr);
        }

        // Without a relay running.
        app.stop().await.expect("stop");
        let removed = cli(&app, &["jobs", "remove", &ids[1], "--json"]).await;
        assert_eq!(removed.code, 0, "{}", removed.stderr);
        assert_eq!(cli(&app, &["jobs", "show", &ids[1]]).await.code, 2);
        let stats = cli(&app, &["queue", "stats", "--json"]).await;
        assert_eq!(stats.json()["completed"], 2);
    }
}
