//! The dashboard in headless Chromium, driven by playwright-core (tests/node):
//! behind ADMIN_TOKEN, a failed job appears in the table, a payload with markup
//! is shown as text (never run), the Retry button delivers the job and the
//! failed count changes; the chart shows the relay's own history (what failed
//! before the page was opened); each destination is listed with its circuit,
//! and its Pause and Resume buttons work; an ordered destination's held key
//! shows in its "held" column.

use std::time::Duration;

use cogrelay::secret::Secret;
use serde_json::{json, Value};

use crate::helpers::*;

fn browser_ready() -> bool {
    let node = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node/node_modules/playwright-core");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ok = node.exists() && std::path::Path::new(&chromium).exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium and tests/node/node_modules are required under CI=true"
        );
        eprintln!("SKIPPED: chromium or tests/node/node_modules missing (apt-get install chromium; npm install --prefix tests/node)");
    }
    ok
}

#[tokio::test]
async fn dashboard_shows_failed_jobs_escapes_payloads_and_retries() {
    if !browser_ready() {
        return;
    }
    let app = spawn_app_with(|c| {
        c.delivery.attempts = 1;
        c.admin.token = Some(Secret::new("dash-token"));
    })
    .await;
    app.sink.set_default(Behaviour::status(500));
    app.post_event(&event("bot", "retry-me")).await;
    let mut xss = event("bot", "xss");
    xss["payload"] = json!({ "html": "<script>window.__pwned=true</script><img src=x onerror=\"window.__pwned=true\">" });
    app.post_event(&xss).await;
    let ok = app
        .admin_as(reqwest::Method::GET, "/admin/queue", "dash-token")
        .await;
    assert_eq!(ok.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c: Value = app
            .http
            .get(format!("http://{}/admin/queue", app.admin))
            .bearer_auth("dash-token")
            .send()
            .await
            .expect("q")
            .json()
            .await
            .expect("json");
        if c["failed"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs never failed: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.sink.set_default(Behaviour::status(200));

    let shot = std::env::temp_dir().join("cogrelay-dashboard.png");
    let admin = format!("http://{}", app.admin);
    let v = run_node(
        "dashboard.mjs",
        &[&admin, "dash-token", &shot.display().to_string()],
    )
    .await;
    assert_eq!(v["failedBefore"], "2");
    assert_eq!(v["failedAfter"], "1");
    assert!(
        v["payloadText"]
            .as_str()
            .expect("payload")
            .contains("<script>window.__pwned=true</script>"),
        "{v}"
    );
    assert_eq!(v["pwned"], false, "markup in a payload must not run");
    assert_eq!(v["dialogs"], 0);
    assert_eq!(v["sparkline"], true);
    // The chart comes from the relay: the two failures happened before the
    // page was opened, and it shows them.
    let rate = v["rate"].as_str().expect("rate");
    assert!(rate.contains("2 failed in the last hour"), "{rate}");
    assert_eq!(v["circuit"], "closed");
    assert_eq!(
        v["pausedShown"], true,
        "Pause shown as paused, then resumed"
    );
    // A refused action's error outlives the refreshes after it (the next
    // one wiped it).
    assert!(
        v["actionError"]
            .as_str()
            .is_some_and(|e| e.contains("999999") && e.contains("not found")),
        "{v}"
    );
    assert!(app.sink.wait_for(3, Duration::from_secs(10)).await);
    assert!(app
        .sink
        .received()
        .iter()
        .any(|r| r.header("x-event-id") == Some("retry-me")
            && r.header("x-delivery-attempt") == Some("1")));
}

/// At 800 and 1400 px wide every button is on screen and clickable (not cut
/// off, not covered), the page does not scroll sideways, the tables fit, and
/// an open circuit shows when its next trial is due.
#[tokio::test]
async fn dashboard_is_usable_from_800_px_and_shows_the_next_trial() {
    if !browser_ready() {
        return;
    }
    let app = spawn_app_with(|c| {
        c.delivery.attempts = 1;
        c.delivery.circuit = cogrelay::destination::CircuitSettings {
            failures: 2,
            cooldown: Duration::from_secs(120),
            max_cooldown: Duration::from_secs(300),
        };
        c.admin.token = Some(Secret::new("dash-token"));
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    for i in 0..3 {
        // Long keys and reasons: the cells must wrap, not widen the table.
        let key = format!("conversation-{i}-{}", "x".repeat(60));
        app.post_event(&event("bot", &key)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let d = destinations(&app).await;
        if d[0]["circuit"] == "open" && d[0]["counts"]["failed"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the circuit never opened: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shot = std::env::temp_dir().join("cogrelay-dashboard-width");
    let admin = format!("http://{}", app.admin);
    let v = run_node(
        "dashboard-widths.mjs",
        &[
            &admin,
            "dash-token",
            &shot.display().to_string(),
            "800",
            "1400",
        ],
    )
    .await;
    for w in ["800", "1400"] {
        let seen = &v[w];
        assert_eq!(seen["pageScrollsSideways"], false, "{w} px: {seen}");
        assert_eq!(
            seen["unusable"],
            json!([]),
            "{w} px: buttons cut off or covered: {seen}"
        );
        assert_eq!(
            seen["scrolled"],
            json!([]),
            "{w} px: a table does not fit: {seen}"
        );
        let circuit = seen["circuits"]["default"].as_str().expect("circuit");
        assert!(
            circuit.starts_with("open, next trial "),
            "{w} px: {circuit}"
        );
    }
}

/// An ordered destination's held key (`on_failure = "hold"`) shows in its
/// "held" column: how many, and on hover the key, its failed job and since
/// when.
#[tokio::test]
async fn dashboard_shows_a_held_key() {
    if !browser_ready() {
        return;
    }
    let app = spawn_app_with(|c| {
        c.admin.token = Some(Secret::new("dash-token"));
        ordered_crm(c, "attempts = 1\non_failure = \"hold\"\n");
    })
    .await;
    app.sink.set_default(Behaviour::status(500));
    let mut e = event("bot", "held-1");
    e["payload"]["sessionId"] = "conversation-7".into();
    let job = app.post_event(&e).await.json["jobs"]["crm"]
        .as_str()
        .expect("job")
        .to_string();
    wait_until("the key held", Duration::from_secs(15), || async {
        destinations(&app).await[0]["held_keys"]
            .as_array()
            .is_some_and(|h| h.len() == 1)
    })
    .await;
    let admin = format!("http://{}", app.admin);
    let v = run_node("dashboard-held.mjs", &[&admin, "dash-token", "crm"]).await;
    assert_eq!(v["held"], "1", "{v}");
    let title = v["title"].as_str().expect("title");
    assert!(
        title.contains(&format!("conversation-7: job {job} since")),
        "{title}"
    );
}

/// A destination the file no longer gives, paused and holding a key: its
/// row offers Resume (it offered nothing, and the API had paused it).
#[tokio::test]
async fn a_paused_destination_the_file_no_longer_gives_offers_resume() {
    if !browser_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("cogrelay.toml");
    let other = Sink::start().await.expect("sink");
    let other_table = format!(
        "[[destination]]\nname = \"other\"\nurl = \"{}\"\n",
        other.url()
    );
    let path = file.clone();
    let both = other_table.clone();
    let app = spawn_app_with(move |c| {
        c.admin.token = Some(Secret::new("dash-token"));
        let crm = format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\nordering = \"session\"\non_failure = \"hold\"\n",
            c.delivery.target
        );
        use_file(c, &path, &format!("{crm}{both}"));
    })
    .await;
    app.sink.set_default(Behaviour::status(500));
    let mut e = event("bot", "held-1");
    e["payload"]["sessionId"] = "conversation-7".into();
    assert_eq!(app.post_event(&e).await.status, 200);
    wait_until("the key held", Duration::from_secs(15), || async {
        destinations(&app).await[0]["held_keys"]
            .as_array()
            .is_some_and(|h| h.len() == 1)
    })
    .await;
    let paused = app
        .admin_as(
            reqwest::Method::POST,
            "/admin/destinations/crm/pause",
            "dash-token",
        )
        .await;
    assert_eq!(paused.status(), 200);
    std::fs::write(&file, other_table).expect("write");
    app.reload.send(()).await.expect("reload");
    wait_until("crm shown as removed", Duration::from_secs(15), || async {
        destinations(&app)
            .await
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["name"] == "crm" && d["configured"] == false && d["paused"] == true)
    })
    .await;
    let admin = format!("http://{}", app.admin);
    let v = run_node("dashboard-held.mjs", &[&admin, "dash-token", "crm"]).await;
    assert_eq!(v["actions"], json!(["Resume", "Retry failed"]), "{v}");
}

/// On Redis, a destination whose state cannot be read (a key of its queue a
/// tool made another type): its row shows `?` with why on hover and offers
/// no pause, the queue's counts (which cannot be summed) show `?`, and the
/// rest of the page is still drawn (a failed count stopped it all).
#[tokio::test]
async fn a_destination_that_cannot_be_read_shows_why_and_the_rest_is_drawn() {
    if !browser_ready() || !crate::redis_server::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("cogrelay.toml");
    let app = spawn_app_on(Backend::Redis, |c| {
        c.admin.token = Some(Secret::new("dash-token"));
        let text = format!(
            "[[destination]]\nname = \"default\"\nurl = \"{0}\"\n[[destination]]\nname = \"crm\"\nurl = \"{0}\"\n",
            c.delivery.target
        );
        use_file(c, &file, &text);
    })
    .await;
    assert_eq!(app.post_event(&event("bot", "one")).await.status, 200);
    assert!(app.sink.wait_for(2, Duration::from_secs(15)).await);
    let redis = app.redis.as_ref().expect("redis");
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("bull:{}.crm:wait", app.config.store.queue_name))
        .arg("not a list")
        .query_async(&mut conn)
        .await
        .expect("set");
    let admin = format!("http://{}", app.admin);
    let v = run_node("dashboard-held.mjs", &[&admin, "dash-token", "crm"]).await;
    assert_eq!(v["held"], "?", "{v}");
    assert_eq!(v["actions"], json!(["Retry failed"]), "{v}");
    assert!(
        v["rowTitle"]
            .as_str()
            .is_some_and(|t| t.contains("WRONGTYPE")),
        "{v}"
    );
    assert_eq!(v["waiting"], "?", "{v}");
    assert!(
        v["error"].as_str().is_some_and(|t| t.contains("WRONGTYPE")),
        "{v}"
    );
}

/// `GET /admin/destinations` with the dashboard tests' token.
async fn destinations(app: &TestApp) -> Value {
    app.admin_as(reqwest::Method::GET, "/admin/destinations", "dash-token")
        .await
        .json()
        .await
        .expect("json")
}
