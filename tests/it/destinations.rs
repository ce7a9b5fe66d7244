//! The destinations file (SPEC §7): `cogrelay config check` on the real
//! binary, the rules between the file and `TARGET_ENDPOINT`, and a relay that
//! delivers to the file's destination with its static headers.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cogrelay::config::destinations::{self, Globals};
use cogrelay::destination::DestinationSet;

use crate::helpers::*;

const CRM_KEY: &str = "crm-key-4711";
const CRM_WHSEC: &str = "whsec_c2VjcmV0LXNpZ25pbmcta2V5";

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

const EXAMPLE: &str = r#"
[[destination]]
name = "crm"
url = "https://crm.internal/cognigy"
events = ["conversation.*"]
headers = { "X-Api-Key" = "${CRM_API_KEY}" }
signing_secret = "${CRM_WHSEC}"
rate_limit = 50

[[destination]]
name = "warehouse"
url = "http://warehouse.internal:8080/events"

[[destination]]
name = "ticketing"
url = "https://tickets.internal/hooks/cognigy"
events = ["handover.*"]
"#;

/// `cogrelay <args>` in `dir` (no `.env`, no `./cogrelay.toml` unless the
/// test wrote one), with the CRM credentials in its environment.
fn cogrelay(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(args)
        .current_dir(dir)
        .env_remove("TARGET_ENDPOINT")
        .env_remove("COGRELAY_CONFIG")
        .env("CRM_API_KEY", CRM_KEY)
        .env("CRM_WHSEC", CRM_WHSEC)
        .env("WEBHOOK_SIGNING_SECRET", "ingress-secret")
        .output()
        .expect("run cogrelay")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn config_check_prints_the_resolved_destinations_without_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("cogrelay.toml"), EXAMPLE).expect("write");
    // ./cogrelay.toml is read when COGRELAY_CONFIG is not set.
    let out = cogrelay(dir.path(), &["config", "check"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let resolved: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let names: Vec<&str> = resolved["destinations"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["crm", "warehouse", "ticketing"]);
    let crm = &resolved["destinations"][0];
    assert_eq!(crm["rate_limit"], 50);
    assert_eq!(crm["attempts"], 5, "ATTEMPTS where the file says nothing");
    assert_eq!(crm["circuit"]["failures"], 5, "CIRCUIT_FAILURES");
    assert_eq!(crm["signing_secret"], "***");
    assert_eq!(crm["headers"]["x-api-key"], "***");
    for secret in [CRM_KEY, "c2VjcmV0LXNpZ25pbmcta2V5", "ingress-secret"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown"
        );
    }
    assert!(
        stderr.is_empty(),
        "nothing to note on the embedded queue: {stderr}"
    );
}

#[test]
fn a_bad_file_is_one_line_naming_file_destination_and_key_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("relay.toml");
    let bad = EXAMPLE.replace("rate_limit = 50", "rate_limit = \"fast\"");
    std::fs::write(&path, bad).expect("write");
    let out = cogrelay(dir.path(), &["config", "check", "--config", "relay.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: relay.toml: destination \"crm\": key rate_limit: must be a whole number"
    );
    assert!(out.stdout.is_empty());

    // An unset ${VAR} is named; the value of a set one never is.
    std::fs::write(&path, EXAMPLE).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["config", "check", "--config", "relay.toml"])
        .current_dir(dir.path())
        .env_remove("TARGET_ENDPOINT")
        .env_remove("CRM_API_KEY")
        .env("CRM_WHSEC", CRM_WHSEC)
        .env("WEBHOOK_SIGNING_SECRET", "s")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("destination \"crm\": key headers.X-Api-Key: ${CRM_API_KEY} is not set"),
        "{stderr}"
    );

    // A missing file named explicitly is an error, not "no file".
    let out = cogrelay(dir.path(), &["config", "check", "--config", "nope.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope.toml: cannot be read"));

    // An empty list, as `serve` refuses it (the check passed it).
    std::fs::write(&path, "destination = []\n").expect("write");
    let out = cogrelay(dir.path(), &["config", "check", "--config", "relay.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("relay.toml: no destination"),
        "{}",
        text(&out.stderr)
    );
}

/// `config check` needs no ingress secret (a note says `serve` does), and
/// names every problem of the file, one line each; a token in a URL's query
/// (`${VAR}`) is never printed (on 27e726d: it stopped at the first
/// problem, refused to run without WEBHOOK_SIGNING_SECRET, and printed the
/// query of a bad URL).
#[test]
fn config_check_names_every_problem_without_the_serve_secrets_and_hides_query_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[[destination]]\nname = \"crm\"\nurl = \"ftp://crm.internal/hook?token=${CRM_API_KEY}\"\n\n\
         [[destination]]\nname = \"ok\"\nurl = \"http://ok.internal/\"\n\n\
         [[destination]]\nname = \"wh\"\nurl = \"http://wh.internal/\"\nattempts = 0\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["config", "check", "--config", "relay.toml"])
        .current_dir(dir.path())
        .env_remove("TARGET_ENDPOINT")
        .env_remove("WEBHOOK_SIGNING_SECRET")
        .env("CRM_API_KEY", CRM_KEY)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(!stderr.contains(CRM_KEY), "the token printed: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "both bad destinations named: {stderr}");
    assert!(
        errors[0].contains("\"crm\"") && errors[0].contains("?***"),
        "{stderr}"
    );
    assert!(
        errors[1].contains("\"wh\"") && errors[1].contains("attempts"),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: no ingress authentication"),
        "{stderr}"
    );

    // A URL's credentials and query are shown masked, so the operator sees
    // that they are there (they were dropped: the URL looked bare).
    std::fs::write(
        &path,
        "[[destination]]\nname = \"ok\"\nurl = \"http://relay:${CRM_API_KEY}@ok.internal/in?token=${CRM_API_KEY}\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["config", "check", "--config", "relay.toml"])
        .current_dir(dir.path())
        .env_remove("TARGET_ENDPOINT")
        .env_remove("WEBHOOK_SIGNING_SECRET")
        .env("CRM_API_KEY", CRM_KEY)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains(CRM_KEY), "the key printed: {stdout}");
    assert!(stdout.contains("http://***@ok.internal/in?***"), "{stdout}");
}

#[test]
fn target_endpoint_and_a_file_together_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("cogrelay.toml"), EXAMPLE).expect("write");
    let out = cogrelay(
        dir.path(),
        &[
            "config",
            "check",
            "--target-endpoint",
            "http://127.0.0.1:9/x",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("TARGET_ENDPOINT is set and so is the destinations file")
            && stderr.contains("cogrelay.toml"),
        "{stderr}"
    );
    // Neither: the old message, now naming the file too.
    let empty = tempfile::tempdir().expect("tmp");
    let out = cogrelay(empty.path(), &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("TARGET_ENDPOINT is not set"));

    // Without a file, TARGET_ENDPOINT is the one destination `default`.
    let out = cogrelay(
        empty.path(),
        &[
            "config",
            "check",
            "--target-endpoint",
            "http://user:pw@127.0.0.1:9/x",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(resolved["destinations"][0]["name"], "default");
    assert_eq!(resolved["destinations"][0]["events"][0], "*");
    assert!(
        !text(&out.stdout).contains("pw@"),
        "no credentials in the URL"
    );
}

both_backends! {
    /// A relay whose file names one destination delivers there, with its
    /// static headers (the relay's own headers win over a file's).
    async fn the_files_destination_gets_its_static_headers(b: Backend) {
        let mut app = spawn_app_on(b, |c| {
            let file = format!(
                "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\n\
                 headers = {{ \"X-Api-Key\" = \"${{CRM_API_KEY}}\", \"Idempotency-Key\" = \"from-file\" }}\n",
                c.delivery.target
            );
            let globals = Globals {
                delivery: c.delivery.clone(),
                lock_duration: c.pool.lock_duration,
            };
            let env = |var: &str| (var == "CRM_API_KEY").then(|| CRM_KEY.to_string());
            let list = destinations::parse(&file, "test.toml", &globals, &env).expect("valid");
            c.destinations_file = Some(DestinationSet { list, file: Some("test.toml".into()) });
        })
        .await;
        let reply = app.post_event(&event("bot-1", "dest-1")).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert!(app.sink.wait_for(1, WAIT).await, "delivered");
        let got = &app.sink.received()[0];
        assert_eq!(got.header("x-api-key"), Some(CRM_KEY));
        assert_eq!(got.header("idempotency-key"), Some("cognigy-bot-1-dest-1"));
        app.stop().await.expect("clean stop");
    }
}

/// A relay on the embedded queue with these destinations (`file` gets the
/// targets' URLs, the first being the app's own sink).
async fn relay_with_destinations(
    sinks: usize,
    file: impl FnOnce(&[String]) -> String,
    tweak: impl FnOnce(&mut cogrelay::config::ServeConfig),
) -> (TestApp, Vec<Sink>) {
    relay_on_with_destinations(Backend::Embedded, sinks, file, tweak).await
}

/// [`relay_with_destinations`] on `backend`.
async fn relay_on_with_destinations(
    backend: Backend,
    sinks: usize,
    file: impl FnOnce(&[String]) -> String,
    tweak: impl FnOnce(&mut cogrelay::config::ServeConfig),
) -> (TestApp, Vec<Sink>) {
    let mut extra = Vec::new();
    for _ in 1..sinks {
        extra.push(Sink::start().await.expect("sink"));
    }
    let extra_urls: Vec<String> = extra.iter().map(Sink::url).collect();
    let app = spawn_app_on(backend, |c| {
        let mut urls = vec![c.delivery.target.to_string()];
        urls.extend(extra_urls);
        let text = file(&urls);
        let globals = Globals {
            delivery: c.delivery.clone(),
            lock_duration: c.pool.lock_duration,
        };
        let list = destinations::parse(&text, "test.toml", &globals, &|_| None).expect("valid");
        c.destinations_file = Some(DestinationSet {
            list,
            file: Some("test.toml".into()),
        });
        tweak(c);
    })
    .await;
    (app, extra)
}

fn typed(bot: &str, id: &str, ty: &str) -> serde_json::Value {
    let mut e = event(bot, id);
    e["type"] = ty.into();
    e
}

/// The event ids a target received, sorted.
fn ids(sink: &Sink) -> Vec<String> {
    let mut v: Vec<String> = sink
        .received()
        .iter()
        .filter_map(|r| r.header("x-event-id").map(str::to_string))
        .collect();
    v.sort();
    v
}

async fn admin_json(app: &TestApp, path: &str) -> serde_json::Value {
    app.admin_get(path).await.json
}

both_backends! {
/// Two envelopes that share the key `cognigy-bot-a-x` (SPEC §3.1), each
/// stored for two destinations in one step (the routed add): two events,
/// each delivered to both, each resend a duplicate of its own.
async fn envelopes_that_share_a_key_fan_out_as_two_events(b: Backend) {
    let (app, extra) = relay_on_with_destinations(
        b,
        2,
        |u| format!("[[destination]]\nname = \"crm\"\nurl = \"{}\"\n[[destination]]\nname = \"dw\"\nurl = \"{}\"\n", u[0], u[1]),
        |_| {},
    )
    .await;
    let sent = [event("bot-a", "x"), event("bot", "a-x")];
    let mut answers = Vec::new();
    for e in &sent {
        let r = app.post_event(e).await;
        assert_eq!(r.json["status"], "accepted", "{}", r.json);
        answers.push(r.json["jobs"].clone());
    }
    assert_ne!(answers[0], answers[1]);
    for (e, jobs) in sent.iter().zip(&answers) {
        let r = app.post_event(e).await;
        assert_eq!(r.json["status"], "duplicate", "{}", r.json);
        assert_eq!(&r.json["jobs"], jobs, "a duplicate of its own event");
    }
    for sink in [&app.sink, &extra[0]] {
        assert!(sink.wait_for(2, WAIT).await, "delivered");
        assert_eq!(ids(sink), ["a-x", "x"], "both events, once each");
    }
}

/// Fan-out (SPEC §7): one job per destination that wants the event, all in
/// one durable step; the answer names each job; an event no one wants is
/// `unrouted`, stores nothing and is counted; each target gets exactly its
/// events, once.
async fn each_destination_gets_exactly_the_events_it_wants(b: Backend) {
    let (mut app, extra) = relay_on_with_destinations(
        b,
        3,
        |u| {
            format!(
                "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nevents = [\"conversation.*\"]\n\
                 [[destination]]\nname = \"warehouse\"\nurl = \"{}\"\nevents = [\"conversation.*\", \"handover.*\", \"message.*\"]\n\
                 [[destination]]\nname = \"ticketing\"\nurl = \"{}\"\nevents = [\"handover.*\"]\nbots = [\"bot-sales\"]\n",
                u[0], u[1], u[2]
            )
        },
        |_| {},
    )
    .await;
    let (crm, warehouse, ticketing) = (&app.sink, &extra[0], &extra[1]);
    // id, type, bot, the destinations that want it (in the file's order)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "c1",
            "conversation.started",
            "bot-sales",
            &["crm", "warehouse"],
        ),
        (
            "c2",
            "conversation.ended",
            "bot-support",
            &["crm", "warehouse"],
        ),
        (
            "h1",
            "handover.requested",
            "bot-sales",
            &["warehouse", "ticketing"],
        ),
        ("h2", "handover.requested", "bot-support", &["warehouse"]),
        ("m1", "message.received", "bot-sales", &["warehouse"]),
        ("x1", "analytics.tick", "bot-sales", &[]),
    ];
    for (id, ty, bot, wanted) in cases {
        let reply = app.post_event(&typed(bot, id, ty)).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        if wanted.is_empty() {
            assert_eq!(reply.json, serde_json::json!({"status": "unrouted"}));
            continue;
        }
        assert_eq!(reply.json["status"], "accepted", "{}", reply.json);
        let jobs = reply.json["jobs"].as_object().expect("jobs");
        let mut got: Vec<&str> = jobs.keys().map(String::as_str).collect();
        got.sort();
        let mut expected: Vec<&str> = wanted.to_vec();
        expected.sort();
        assert_eq!(got, expected, "{id}: {}", reply.json);
        assert_eq!(
            reply.json["jobId"], jobs[wanted[0]],
            "jobId is the first destination's"
        );
        // The same event again: the same jobs, nothing new stored.
        let again = app.post_event(&typed(bot, id, ty)).await;
        assert_eq!(again.json["status"], "duplicate");
        assert_eq!(again.json["jobs"], reply.json["jobs"]);
    }
    // Every job finished: nothing more can arrive.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let q = admin_json(&app, "/admin/queue").await;
        if q["completed"] == 8 && q["waiting"] == 0 && q["active"] == 0 && q["delayed"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not settled: {q}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ids(crm), ["c1", "c2"]);
    assert_eq!(ids(warehouse), ["c1", "c2", "h1", "h2", "m1"]);
    assert_eq!(ids(ticketing), ["h1"]);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("cogrelay_events_unrouted_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"cogrelay_destination_deliveries_total{destination="warehouse",outcome="delivered"} 5"#
        ),
        "{metrics}"
    );
    app.stop().await.expect("clean stop");
}
}

both_backends! {
/// `where` conditions (SPEC §7) in documents the ingress accepts but
/// serde_json cannot build whole: a lone surrogate escape (what JavaScript
/// writes for half an emoji), a number beyond `f64`, nesting at serde_json's
/// limit. Each is routed by its channel (they were answered `unrouted` and
/// dropped when the conditions built the whole document).
async fn where_conditions_hold_in_documents_serde_json_cannot_build_whole(b: Backend) {
    let (mut app, extra) = relay_on_with_destinations(
        b,
        2,
        |u| {
            format!(
                "[[destination]]\nname = \"voice\"\nurl = \"{}\"\nwhere = {{ \"/payload/channel\" = \"voice\" }}\n\
                 [[destination]]\nname = \"chat\"\nurl = \"{}\"\nwhere = {{ \"/payload/channel\" = \"chat\" }}\n",
                u[0], u[1]
            )
        },
        |_| {},
    )
    .await;
    let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
    let cases = [
        ("lone", r#""hi \ud83d""#, "voice"),
        ("huge", "1e400", "voice"),
        ("deep", deep.as_str(), "chat"),
        ("none", "1", "sms"),
    ];
    for (id, odd, channel) in cases {
        let body = format!(
            r#"{{"botId":"bot","eventId":"{id}","type":"message.received","payload":{{"odd":{odd},"channel":"{channel}"}}}}"#
        );
        let reply = app.post_signed(body.into_bytes()).await;
        assert_eq!(reply.status, 200, "{id}: {}", reply.json);
        let want = if channel == "sms" { "unrouted" } else { "accepted" };
        assert_eq!(reply.json["status"], want, "{id}: {}", reply.json);
        if want == "accepted" {
            let jobs = reply.json["jobs"].as_object().expect("jobs");
            assert_eq!(jobs.keys().collect::<Vec<_>>(), [channel], "{id}");
        }
    }
    // A payload written twice: the last is delivered, and routed by (the
    // first, which serde_json cannot build, hid it: the event went nowhere).
    let twice = r#"{"botId":"bot","eventId":"twice","type":"message.received","payload":{"channel":"\ud83d"},"payload":{"channel":"chat"}}"#;
    let reply = app.post_signed(twice.as_bytes().to_vec()).await;
    assert_eq!(reply.json["status"], "accepted", "{}", reply.json);
    assert!(app.sink.wait_for(2, WAIT).await, "voice delivered");
    assert!(extra[0].wait_for(2, WAIT).await, "chat delivered");
    assert_eq!(ids(&app.sink), ["huge", "lone"]);
    assert_eq!(ids(&extra[0]), ["deep", "twice"]);
    // Delivered byte for byte.
    let lone = app
        .sink
        .received()
        .into_iter()
        .find(|r| r.header("x-event-id") == Some("lone"))
        .expect("lone");
    assert!(
        String::from_utf8_lossy(&lone.body).contains(r#""hi \ud83d""#),
        "{}",
        String::from_utf8_lossy(&lone.body)
    );
    app.stop().await.expect("clean stop");
}
}

/// Isolation (SPEC §7): a destination that hangs until its timeout, and one
/// that answers 503 to everything, hold only their own workers: a healthy
/// destination's deliveries go on.
#[tokio::test]
async fn a_failing_and_a_hanging_destination_do_not_hold_up_a_healthy_one() {
    let (mut app, extra) = relay_with_destinations(
        3,
        |u| {
            format!(
                "[[destination]]\nname = \"healthy\"\nurl = \"{}\"\n\
                 [[destination]]\nname = \"failing\"\nurl = \"{}\"\nattempts = 100\nbackoff_ms = 50\n\
                 [[destination]]\nname = \"hanging\"\nurl = \"{}\"\nconcurrency = 2\ntimeout_ms = 2000\nattempts = 100\n",
                u[0], u[1], u[2]
            )
        },
        |c| c.delivery.concurrency = 2,
    )
    .await;
    let (failing, hanging) = (&extra[0], &extra[1]);
    failing.set_default(Behaviour::status(503));
    hanging.set_default(Behaviour::Delay(std::time::Duration::from_secs(60), 200));
    let n = 60;
    for i in 0..n {
        let reply = app.post_event(&event("bot", &format!("iso-{i}"))).await;
        assert_eq!(reply.status, 200);
    }
    assert!(
        app.sink.wait_for(n, WAIT).await,
        "the healthy destination got {} of {n}",
        app.sink.count()
    );
    assert!(
        failing.posts() > 0 && hanging.posts() > 0,
        "the others were tried"
    );
    assert!(
        hanging.posts() <= 2,
        "the hanging one holds its own 2 workers only"
    );
    app.stop().await.expect("clean stop");
}

/// A destination limited to 20 requests a second never sees more than 20 in
/// any second (measured at the target, over every window that starts at a
/// request), while an unlimited one beside it gets every event at once.
#[tokio::test]
async fn a_rate_limited_destination_never_sees_more_than_its_limit_in_any_second() {
    let (mut app, extra) = relay_with_destinations(
        2,
        |u| {
            format!(
                "[[destination]]\nname = \"limited\"\nurl = \"{}\"\nrate_limit = 20\nconcurrency = 8\n\
                 [[destination]]\nname = \"free\"\nurl = \"{}\"\n",
                u[0], u[1]
            )
        },
        // Every completed job kept: the attempts' starts are read from them.
        |c| c.store.retention.remove_on_complete = 10_000,
    )
    .await;
    let n = 70;
    let lag = Lag::watch();
    for i in 0..n {
        let reply = app.post_event(&event("bot", &format!("rl-{i}"))).await;
        assert_eq!(reply.status, 200);
    }
    let free = &extra[0];
    assert!(
        free.wait_for(n, WAIT).await,
        "the unlimited one got them all"
    );
    let limited_so_far = app.sink.count();
    assert!(
        limited_so_far < n,
        "the limited one is still being paced ({limited_so_far} of {n})"
    );
    assert!(
        app.sink.wait_for(n, Duration::from_secs(20)).await,
        "all delivered in the end"
    );
    // Counted where the limit is kept, at each attempt's start as the relay
    // recorded it: at the target, a starved test process can read requests
    // sent over more than a second as one burst (seen with the load average
    // at 8 on two cores).
    let late_ms = lag.worst_ms();
    let most = busiest_second_started(&app, "limited", n).await;
    let allowed = 20 + late_starts(late_ms, 20);
    assert!(
        most <= allowed,
        "{most} attempts started within one second (the machine ran up to {late_ms} ms late)"
    );
    assert!(busiest_second(&app.sink) >= 6);
    // Not 1 or 2 a second, whatever the machine's load (see the Redis test).
    assert!(
        most >= 6,
        "the limit is used ({most} in the busiest second)"
    );
    app.stop().await.expect("clean stop");
}

async fn admin_post(app: &TestApp, path: &str) -> (u16, serde_json::Value) {
    let r = app
        .http
        .post(format!("http://{}{path}", app.admin))
        .send()
        .await
        .expect("admin");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// The operator's view (SPEC §7): `GET /admin/destinations`, pause and resume
/// (a paused destination's jobs are stored, not attempted), listings and
/// retry-all by destination, and the same from the command line beside the
/// running relay.
#[tokio::test]
async fn operators_see_pause_and_retry_each_destination() {
    let (mut app, extra) = relay_with_destinations(
        2,
        |u| {
            let with_creds = u[1].replacen("http://", "http://user:secret-pw@", 1);
            format!(
                "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\nrate_limit = 50\n\
                 [[destination]]\nname = \"warehouse\"\nurl = \"{with_creds}\"\nattempts = 1\nconcurrency = 3\n",
                u[0]
            )
        },
        |_| {},
    )
    .await;
    let warehouse = &extra[0];
    // Both refuse everything at first: each event is one failed job per destination.
    app.sink.set_default(Behaviour::status(400));
    warehouse.set_default(Behaviour::status(400));
    for i in 0..3 {
        app.post_event(&event("bot", &format!("op-{i}"))).await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while admin_json(&app, "/admin/queue").await["failed"] != 6 {
        assert!(std::time::Instant::now() < deadline, "never 6 failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = admin_json(&app, "/admin/destinations").await;
    assert_eq!(listed[0]["name"], "crm");
    assert_eq!(listed[0]["circuit"], "closed");
    assert_eq!(listed[0]["paused"], false);
    assert_eq!(listed[0]["counts"]["failed"], 3);
    assert_eq!(listed[0]["rate_limit"], 50);
    assert_eq!(listed[1]["concurrency"], 3);
    assert!(!listed.to_string().contains("secret-pw"), "{listed}");

    // Listing and retry-all by destination.
    let crm_failed = admin_json(&app, "/admin/jobs?state=failed&destination=crm").await;
    assert_eq!(crm_failed["total"], 3);
    assert!(crm_failed["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|j| j["destination"] == "crm"));
    let bad = app
        .http
        .get(format!(
            "http://{}/admin/jobs?destination=No%20Such",
            app.admin
        ))
        .send()
        .await
        .expect("bad");
    assert_eq!(bad.status(), 400);

    // Pause crm: its retried jobs and new events wait; warehouse's go on.
    assert_eq!(
        admin_post(&app, "/admin/destinations/crm/pause").await.0,
        200
    );
    assert_eq!(
        admin_post(&app, "/admin/destinations/nope/pause").await.0,
        404
    );
    app.sink.set_default(Behaviour::status(200));
    warehouse.set_default(Behaviour::status(200));
    let (status, retried) =
        admin_post(&app, "/admin/jobs/retry?state=failed&destination=crm").await;
    assert_eq!((status, retried["retried"].clone()), (200, 3.into()));
    app.post_event(&event("bot", "while-paused")).await;
    assert!(
        warehouse.wait_for(4, WAIT).await,
        "warehouse gets the new event"
    );
    let before = app.sink.count();
    let crm = admin_json(&app, "/admin/destinations").await[0].clone();
    assert_eq!(crm["paused"], true);
    assert_eq!(crm["counts"]["waiting"], 4, "stored, not attempted: {crm}");
    assert_eq!(
        admin_json(&app, "/admin/queue").await["failed"],
        3,
        "warehouse's 3 stay failed"
    );

    // The command line sees the same store, beside the relay.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cogrelay"))
            .args(args)
            .env("COGRELAY_DATA_DIR", &app.data_dir)
            .env_remove("REDIS_URL")
            .env_remove("COGRELAY_QUEUE")
            .output()
            .expect("run")
    };
    let out = cli(&["destinations", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows[0]["name"], "crm");
    assert_eq!(rows[0]["paused"], true);
    let out = cli(&[
        "jobs",
        "list",
        "--destination",
        "warehouse",
        "--state",
        "failed",
        "--json",
    ]);
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(page["total"], 3);
    let out = cli(&["destinations", "resume", "crm"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("destination crm resumed"));
    assert_eq!(before, 3, "crm was tried only before the pause");
    assert!(
        app.sink.wait_for(3 + 4, WAIT).await,
        "resumed: crm gets its 4 waiting jobs"
    );
    let out = cli(&["destinations", "pause", "Bad Name"]);
    assert_eq!(out.status.code(), Some(2));
    app.stop().await.expect("clean stop");
}

both_backends! {
    /// Without a file the one destination is `default`: listed, and paused
    /// and resumed like any (on Redis with BullMQ's own pause of the queue).
    async fn the_default_destination_pauses_and_resumes(b: Backend) {
        let mut app = spawn_app_on(b, |_| {}).await;
        let listed = admin_json(&app, "/admin/destinations").await;
        assert_eq!(listed[0]["name"], "default");
        assert_eq!(admin_post(&app, "/admin/destinations/default/pause").await.0, 200);
        let reply = app.post_event(&event("bot", "paused-1")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json.get("jobs"), None, "the seeds' answer without a file");
        // Stored and waiting, as the relay reports it once it looked.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let d = admin_json(&app, "/admin/destinations").await;
            if d[0]["paused"] == true && d[0]["counts"]["waiting"] == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{d}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(app.sink.count(), 0, "nothing attempted while paused");
        assert_eq!(admin_post(&app, "/admin/destinations/default/resume").await.0, 200);
        assert!(app.sink.wait_for(1, WAIT).await, "delivered after resume");
        app.stop().await.expect("clean stop");
    }
}

both_backends! {
/// A reload while a delivery is still at its slow target, past
/// `SHUTDOWN_GRACE_MS`, lets it end: the job is sent once. (The old pool
/// cut it off after the grace, and the new pool sent it again to a target
/// that had it.)
async fn a_reload_lets_a_slow_delivery_end_and_sends_it_once(b: Backend) {
    let (mut app, _dir) = relay_with_slow_file(b, "", None).await;
    // Within the delivery timeout (1 s), past the grace.
    app.sink
        .set_default(Behaviour::Delay(Duration::from_millis(800), 200));
    let r = app.post_event(&event("bot", "slow-1")).await;
    assert_eq!(r.json["status"], "accepted", "{}", r.json);
    let id = r.json["jobId"].as_str().expect("id").to_string();
    assert!(app.sink.wait_for(1, WAIT).await, "the delivery started");
    app.reload.send(()).await.expect("reload");
    app.wait_job(&id, "completed", WAIT).await;
    assert_eq!(app.sink.count(), 1, "sent once");
    // The relay goes on with the new pool.
    let r = app.post_event(&event("bot", "after")).await;
    assert_eq!(r.json["status"], "accepted", "{}", r.json);
    assert!(app.sink.wait_for(2, WAIT).await, "delivered after the reload");
    app.stop().await.expect("clean stop");
}
}

/// Reloads in a row while deliveries are slow: each waits for the last
/// one's old pool to end its deliveries, so at most two pools of the
/// destination deliver at once (`concurrency = 1`: at most two requests
/// at the target; each reload's old pool added its own), and every event
/// is delivered once.
#[tokio::test]
async fn reloads_in_a_row_keep_at_most_two_pools_delivering() {
    let (app, _dir) = relay_with_slow_file(Backend::Embedded, "concurrency = 1", None).await;
    let delay = Duration::from_millis(600);
    app.sink.set_default(Behaviour::Delay(delay, 200));
    for i in 0..6 {
        let r = app.post_event(&event("bot", &format!("r{i}"))).await;
        assert_eq!(r.json["status"], "accepted", "{}", r.json);
    }
    assert!(
        app.sink.wait_for(1, WAIT).await,
        "the first delivery started"
    );
    // Each reload once the pools before it have a delivery out.
    for k in 1..=4 {
        app.reload.send(()).await.expect("reload");
        assert!(
            app.sink.wait_for(k + 1, WAIT).await,
            "delivering after reload {k}"
        );
    }
    assert!(
        app.sink.wait_for(6, Duration::from_secs(30)).await,
        "all delivered"
    );
    app.wait_counts(WAIT, |c| c["completed"] == 6).await;
    let received = app.sink.received();
    let mut ids: Vec<&str> = received
        .iter()
        .filter_map(|r| r.header("x-event-id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), received.len()), (6, 6), "each once");
    // Requests at the target at once: those that came while another was
    // still within its delay (less a margin for the clocks).
    let window = delay - Duration::from_millis(100);
    let most = received
        .iter()
        .map(|r| {
            received
                .iter()
                .filter(|o| o.at <= r.at && r.at < o.at + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(most <= 2, "{most} requests at once");
}

/// A stop while a reload's old pool waits for its delivery in flight gives
/// that delivery `SHUTDOWN_GRACE_MS`, as any stop does: the stop does not
/// wait out the delivery's 20 s timeout, and the job, back in the store, is
/// delivered after a restart.
#[tokio::test]
async fn a_stop_during_a_reload_gives_the_old_deliveries_the_grace() {
    let (mut app, _dir) = relay_with_slow_file(
        Backend::Embedded,
        "timeout_ms = 20000",
        Some(Duration::from_secs(30)),
    )
    .await;
    app.sink.set_default(Behaviour::Hang);
    let r = app.post_event(&event("bot", "hung")).await;
    let id = r.json["jobId"].as_str().expect("id").to_string();
    assert!(app.sink.wait_for(1, WAIT).await, "the delivery started");
    app.reload.send(()).await.expect("reload");
    // The old pool still running beside the new one.
    wait_until("two pools running", WAIT, || {
        let app = &app;
        async move {
            app.metrics_text()
                .await
                .lines()
                .any(|l| l == "cogrelay_delivery_pools 2")
        }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the stop gave the grace, not the delivery's timeout")
        .expect("clean stop");
    app.sink.set_default(Behaviour::status(200));
    let app = app.restart().await;
    app.wait_job(&id, "completed", WAIT).await;
}

/// A relay on `backend` whose one destination `slow` (the app's sink, with
/// the `extra` lines) is read from a file that a reload reads again, with
/// a 200 ms `SHUTDOWN_GRACE_MS` and the lease `lock` if given; the file's
/// directory, to keep while the relay runs.
async fn relay_with_slow_file(
    b: Backend,
    extra: &str,
    lock: Option<Duration>,
) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("relay.toml");
    let extra = extra.to_string();
    let app = spawn_app_on(b, move |c| {
        c.pool.shutdown_grace = Duration::from_millis(200);
        if let Some(lock) = lock {
            c.pool.lock_duration = lock;
        }
        let text = format!(
            "[[destination]]\nname = \"slow\"\nurl = \"{}\"\n{extra}\n",
            c.delivery.target
        );
        std::fs::write(&file, text).expect("write");
        let globals = Globals {
            delivery: c.delivery.clone(),
            lock_duration: c.pool.lock_duration,
        };
        c.destinations_file =
            Some(destinations::load(&file, &globals, &|_| None).expect("valid file"));
    })
    .await;
    (app, dir)
}

/// A relay started from the file at `path` (embedded queue).
async fn relay_from_file(path: &Path) -> TestApp {
    let path = path.to_path_buf();
    spawn_app_on(Backend::Embedded, move |c| {
        let globals = Globals {
            delivery: c.delivery.clone(),
            lock_duration: c.pool.lock_duration,
        };
        c.destinations_file =
            Some(destinations::load(&path, &globals, &|_| None).expect("valid file"));
    })
    .await
}

/// Until the admin API lists exactly `names` as the file's destinations
/// (a removed one with jobs left is listed after them, `configured: false`).
async fn wait_for_names(app: &TestApp, names: &[&str]) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listed = admin_json(app, "/admin/destinations").await;
        let got: Vec<&str> = listed
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|d| d["configured"] == true)
                    .filter_map(|d| d["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if got == names {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "destinations: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reload (SPEC §7): added, changed and removed destinations take effect
/// without a restart; events posted while the file is read again are each
/// delivered once; a removed destination's jobs stay listed, retryable and
/// removable; a bad file changes nothing.
#[tokio::test]
async fn a_reload_adds_changes_and_removes_destinations_losing_nothing() {
    let crm = Sink::start().await.expect("sink");
    let warehouse = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cogrelay.toml");
    let one = |extra: &str| {
        format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\n{extra}",
            crm.url()
        )
    };
    std::fs::write(&file, one("")).expect("write");
    let mut app = relay_from_file(&file).await;
    wait_for_names(&app, &["crm"]).await;

    // A burst while the file gains a destination and crm gains a header.
    let posting = {
        let poster = app.poster();
        tokio::spawn(async move {
            for i in 0..200 {
                assert_eq!(poster.post(&event("bot", &format!("burst-{i}"))).await, 200);
            }
        })
    };
    let two = format!(
        "{}headers = {{ \"X-Version\" = \"2\" }}\n[[destination]]\nname = \"warehouse\"\nurl = \"{}\"\n",
        one(""),
        warehouse.url()
    );
    std::fs::write(&file, &two).expect("write");
    app.reload.send(()).await.expect("reload");
    posting.await.expect("burst");
    wait_for_names(&app, &["crm", "warehouse"]).await;
    assert!(crm.wait_for(200, WAIT).await, "crm got the burst");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let q = admin_json(&app, "/admin/queue").await;
        if q["waiting"] == 0 && q["active"] == 0 && q["delayed"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{q}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burst = ids(&crm);
    let unique: std::collections::BTreeSet<&String> = burst.iter().collect();
    assert_eq!(burst.len(), 200, "each burst event once at crm");
    assert_eq!(unique.len(), 200);
    // After the reload: the new header, and the new destination.
    app.post_event(&event("bot", "after")).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !ids(&warehouse).contains(&"after".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "warehouse never got it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crm.wait_for(201, WAIT).await);
    let last = crm.received().into_iter().last().expect("one");
    assert_eq!(last.header("x-version"), Some("2"));

    // A bad file: one error, and the running destinations stay.
    std::fs::write(&file, "[[destination]]\nname = \"BAD\"\n").expect("write");
    app.reload.send(()).await.expect("reload");
    app.post_event(&event("bot", "still")).await;
    assert!(crm.wait_for(202, WAIT).await, "crm still delivered to");
    wait_for_names(&app, &["crm", "warehouse"]).await;

    // crm removed, with failed jobs: still listed, retryable, removable; a
    // retried one is delivered when crm is back.
    crm.set_default(Behaviour::status(400));
    let mut failed_ids = Vec::new();
    for id in ["refused-1", "refused-2"] {
        let failed = app.post_event(&event("bot", id)).await;
        let failed_id = failed.json["jobs"]["crm"]
            .as_str()
            .expect("crm job")
            .to_string();
        let deadline = std::time::Instant::now() + WAIT;
        while admin_json(&app, &format!("/admin/jobs/{failed_id}")).await["state"] != "failed" {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failed_ids.push(failed_id);
    }
    std::fs::write(
        &file,
        format!(
            "[[destination]]\nname = \"warehouse\"\nurl = \"{}\"\n",
            warehouse.url()
        ),
    )
    .expect("write");
    app.reload.send(()).await.expect("reload");
    wait_for_names(&app, &["warehouse"]).await;
    let listed = admin_json(&app, "/admin/destinations").await;
    assert_eq!(
        listed[1]["name"], "crm",
        "removed, with failed jobs: {listed}"
    );
    assert_eq!(listed[1]["configured"], false, "{listed}");
    assert_eq!(listed[1]["counts"]["failed"], 2, "{listed}");
    ready_with_pools(&app, 1).await;
    // A removed destination's circuit is no one's: it leaves /metrics.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let m = app.metrics_text().await;
        if !m.contains(r#"cogrelay_destination_circuit{destination="crm""#) {
            assert!(
                m.contains(
                    r#"cogrelay_destination_circuit{destination="warehouse",state="closed"} 1"#
                ),
                "{m}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "crm's circuit stays in /metrics:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = admin_json(&app, "/admin/jobs?destination=crm&state=failed").await;
    assert_eq!(listed["total"], 2, "{listed}");
    let (status, retried) = admin_post(&app, &format!("/admin/jobs/{}/retry", failed_ids[0])).await;
    assert_eq!(status, 200);
    // The answer says the job waits for crm to be back (it said only
    // "retried", and the job then waited unseen).
    let warning = retried["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("crm") && warning.contains("not in this relay's running configuration"),
        "{retried}"
    );
    // A retry of every destination's dead letters names it too.
    let (status, all) = admin_post(&app, "/admin/jobs/retry?state=failed").await;
    assert_eq!(status, 200);
    assert!(
        all["warning"].as_str().unwrap_or_default().contains("crm"),
        "{all}"
    );
    let removed = app
        .http
        .delete(format!("http://{}/admin/jobs/{}", app.admin, failed_ids[1]))
        .send()
        .await
        .expect("remove");
    assert_eq!(removed.status(), 200);
    // crm back: the job retried while it was gone is delivered.
    crm.set_default(Behaviour::status(200));
    std::fs::write(&file, &two).expect("write");
    app.reload.send(()).await.expect("reload");
    wait_for_names(&app, &["crm", "warehouse"]).await;
    app.wait_job(&failed_ids[0], "completed", WAIT).await;
    assert!(
        crm.received()
            .iter()
            .any(|r| r.header("x-event-id") == Some("refused-1")
                && r.header("x-delivery-attempt") == Some("1")),
        "the retried job delivered, its attempts reset"
    );
    ready_with_pools(&app, 2).await;
    app.stop().await.expect("clean stop");
}

/// Once a reload has ended (the new pools running, the old ones gone: the
/// `cogrelay_delivery_pools` gauge at `n`), the relay is ready and says it
/// delivers (on 27e726d an old pool's end set `cogrelay_delivery_up` to 0,
/// and `/readyz` answered 503, after every reload).
async fn ready_with_pools(app: &TestApp, n: usize) {
    let line = format!("cogrelay_delivery_pools {n}");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = app.metrics_text().await;
        if text.lines().any(|l| l == line) {
            assert!(
                text.lines().any(|l| l == "cogrelay_delivery_up 1"),
                "{text}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never {line}: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = app
        .http
        .get(format!("http://{}/readyz", app.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "ready after the reload");
}

/// The real binary re-reads its file on SIGHUP; a bad file is refused in one
/// line and the relay goes on.
#[tokio::test]
async fn sighup_reloads_the_file_in_the_running_binary() {
    let first = Sink::start().await.expect("sink");
    let second = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("relay.toml");
    let d1 = format!(
        "[[destination]]\nname = \"d1\"\nurl = \"{}\"\n",
        first.url()
    );
    std::fs::write(&file, &d1).expect("write");
    let (relay, logs) = crate::process::start_relay_logged(
        dir.path(),
        &first,
        &[
            ("TARGET_ENDPOINT", String::new()),
            ("COGRELAY_CONFIG", file.display().to_string()),
        ],
    )
    .await;
    let pid = relay.child.id().expect("pid");
    let http = reqwest::Client::new();
    assert_eq!(
        crate::process::post(&http, relay.port, "one").await,
        Some(200)
    );
    assert!(first.wait_for(1, WAIT).await);

    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    std::fs::write(
        &file,
        format!(
            "{d1}[[destination]]\nname = \"d2\"\nurl = \"{}\"\n",
            second.url()
        ),
    )
    .expect("write");
    hup();
    let deadline = std::time::Instant::now() + WAIT;
    while !logs.lock().expect("logs").contains("destinations reloaded") {
        assert!(std::time::Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        crate::process::post(&http, relay.port, "two").await,
        Some(200)
    );
    assert!(second.wait_for(1, WAIT).await, "d2 added without a restart");

    std::fs::write(&file, "not toml [").expect("write");
    hup();
    let deadline = std::time::Instant::now() + WAIT;
    while !logs
        .lock()
        .expect("logs")
        .contains("destinations not reloaded")
    {
        assert!(std::time::Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        crate::process::post(&http, relay.port, "three").await,
        Some(200)
    );
    assert!(
        second.wait_for(2, WAIT).await,
        "still running with d1 and d2"
    );
    let text = logs.lock().expect("logs").clone();
    let refusal = text
        .lines()
        .find(|l| l.contains("destinations not reloaded"))
        .expect("line");
    assert!(refusal.contains("relay.toml"), "{refusal}");

    // An empty list is refused as at start (it was taken: every later
    // event answered `unrouted` and dropped).
    std::fs::write(&file, "destination = []\n").expect("write");
    hup();
    wait_until("a second refusal logged", WAIT, || {
        let refusals = logs
            .lock()
            .expect("logs")
            .matches("destinations not reloaded")
            .count();
        async move { refusals >= 2 }
    })
    .await;
    assert!(
        logs.lock().expect("logs").contains("no destination"),
        "the reason named"
    );
    assert_eq!(
        crate::process::post(&http, relay.port, "four").await,
        Some(200)
    );
    assert!(second.wait_for(3, WAIT).await, "still d1 and d2");
}

/// Moving from TARGET_ENDPOINT to a file that names its destination
/// otherwise: the relay says, at start, that `default`'s jobs wait.
#[tokio::test]
async fn jobs_of_an_unconfigured_destination_are_named_at_start() {
    let sink = Sink::start().await.expect("sink");
    sink.set_default(Behaviour::status(503));
    let dir = tempfile::tempdir().expect("tmp");
    let (relay, _) = crate::process::start_relay_logged(
        dir.path(),
        &sink,
        &[("ATTEMPTS", "100".into()), ("CIRCUIT_FAILURES", "0".into())],
    )
    .await;
    let http = reqwest::Client::new();
    for id in ["left-1", "left-2"] {
        assert_eq!(crate::process::post(&http, relay.port, id).await, Some(200));
    }
    assert!(sink.wait_for(2, WAIT).await);
    // Killed, and gone (its lock on the store with it) before the next start:
    // the jobs stay in the store, waiting for `default`.
    let mut relay = relay;
    relay.child.kill().await.expect("kill");

    let file = dir.path().join("cogrelay.toml");
    std::fs::write(
        &file,
        format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{}\"\n",
            sink.url()
        ),
    )
    .expect("write");
    let (_relay, logs) = crate::process::start_relay_logged(
        dir.path(),
        &sink,
        &[("TARGET_ENDPOINT", String::new())],
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = logs.lock().expect("logs").clone();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("jobs of a destination that is not configured"))
        {
            assert!(line.contains("\"destination\":\"default\""), "{line}");
            assert!(line.contains("\"pending\":2"), "{line}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no warning: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two relays on one Redis, three destinations: each event goes to every
/// destination that wants it exactly once, whichever relay took it, and each
/// destination is its own BullMQ queue (`QUEUE_NAME.<name>`).
#[tokio::test]
async fn two_relays_on_one_redis_fan_out_once_per_destination() {
    let Some(redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let sinks = [
        Sink::start().await.expect("sink"),
        Sink::start().await.expect("sink"),
        Sink::start().await.expect("sink"),
    ];
    let file = format!(
        "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nevents = [\"conversation.*\"]\n\
         [[destination]]\nname = \"warehouse\"\nurl = \"{}\"\n\
         [[destination]]\nname = \"ticketing\"\nurl = \"{}\"\nevents = [\"handover.*\"]\n",
        sinks[0].url(),
        sinks[1].url(),
        sinks[2].url()
    );
    let apps = relays_on_redis(2, &redis, &sinks[0], &file).await;
    let types = [
        "conversation.started",
        "handover.requested",
        "message.received",
    ];
    let n = 90;
    for i in 0..n {
        let app = &apps[i % 2].0;
        let reply = app
            .post_event(&typed("bot", &format!("two-{i}"), types[i % 3]))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        // The same event at the other relay: a duplicate, the same jobs.
        let again = apps[(i + 1) % 2]
            .0
            .post_event(&typed("bot", &format!("two-{i}"), types[i % 3]))
            .await;
        assert_eq!(again.json["status"], "duplicate", "{}", again.json);
        assert_eq!(again.json["jobs"], reply.json["jobs"]);
    }
    let per_type = n / 3;
    let expected = [per_type, n, per_type];
    for (sink, want) in sinks.iter().zip(expected) {
        assert!(
            sink.wait_for(want, WAIT).await,
            "{} of {want}",
            sink.count()
        );
    }
    // Settled: nothing waiting, active or delayed in any queue.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let q = admin_json(&apps[0].0, "/admin/queue").await;
        if q["waiting"] == 0 && q["active"] == 0 && q["delayed"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{q}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (sink, want) in sinks.iter().zip(expected) {
        let got = ids(sink);
        let unique: std::collections::BTreeSet<&String> = got.iter().collect();
        assert_eq!((got.len(), unique.len()), (want, want), "each once");
    }
    // Each destination is a BullMQ queue of its own.
    let mut conn = redis.connection().await;
    for name in ["crm", "warehouse", "ticketing"] {
        let key = format!("bull:cognigy-webhook-retries.{name}:meta");
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert!(exists, "{key}");
    }
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

/// Relays on one Redis whose files differ: `extra` only in the file of the
/// relay started last. Each of the others shows the whole queue
/// (docs/scaling-out.md), each through another route as its first look, so
/// that no route finds the queue another one opened: the counts and
/// `/metrics`, the failed list, a job by id, retry-all. And one of them
/// pauses `extra` for every relay. (They showed none of it until a call
/// filtered by `extra` opened that queue.)
#[tokio::test]
async fn a_relay_shows_a_destination_only_another_relays_file_gives() {
    let Some(redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let (apps, id, _sinks) = dead_letter_of_extra(&redis, 4).await;
    let [counts, list, by_id, retry] = [0, 1, 2, 3].map(|i| &apps[i].0);
    counts
        .wait_counts(WAIT, |c| c["failed"] == 1 && c["completed"] == 1)
        .await;
    assert!(
        counts
            .metrics_text()
            .await
            .contains("cogrelay_queue_jobs{state=\"failed\"} 1"),
        "the dead letter in /metrics"
    );
    let failed = admin_json(list, "/admin/jobs?state=failed").await;
    assert_eq!(failed["total"], 1, "{failed}");
    assert_eq!(failed["items"][0]["destination"], "extra", "{failed}");
    let job = by_id.admin_get(&format!("/admin/jobs/{id}")).await;
    assert_eq!(job.status, 200, "{}", job.json);
    assert_eq!(job.json["destination"], "extra", "{}", job.json);
    let (status, retried) = admin_post(retry, "/admin/jobs/retry?state=failed").await;
    assert_eq!(
        (status, retried["retried"].clone()),
        (200, 1.into()),
        "{retried}"
    );
    let (status, paused) = admin_post(counts, "/admin/destinations/extra/pause").await;
    assert_eq!(status, 200, "{paused}");
    let shown = admin_json(&apps[4].0, "/admin/destinations").await;
    let extra = shown
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == "extra")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        extra["paused"], true,
        "paused for the relay whose file gives it: {shown}"
    );
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

/// On shared Redis, a relay that cannot open the queue of a destination only
/// another relay's file gives (here Redis takes no new connection) says so:
/// that queue's job by id, and retry-all, answer 503 naming the queue. (They
/// answered 404, and 200 with what the other queues held: the job looked
/// gone, the replay looked whole.)
#[tokio::test]
async fn a_queue_a_relay_cannot_open_is_named_not_taken_for_empty() {
    let Some(redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let (apps, id, _sinks) = dead_letter_of_extra(&redis, 1).await;
    // From now on Redis refuses every new connection.
    let mut conn = redis.connection().await;
    max_clients(&mut conn, None).await;
    let a = &apps[0].0;
    let job = a.admin_get(&format!("/admin/jobs/{id}")).await;
    let (status, retried) = admin_post(a, "/admin/jobs/retry?state=failed").await;
    max_clients(&mut conn, Some(10_000)).await;
    assert_eq!(job.status, 503, "{}", job.json);
    assert!(
        job.json
            .to_string()
            .contains("the queue of extra could not be opened"),
        "{}",
        job.json
    );
    assert_eq!(status, 503, "{retried}");
    assert!(
        retried
            .to_string()
            .contains("0 failed jobs went back to waiting; the queue of extra"),
        "{retried}"
    );
    // Redis takes connections again: the next lookup opens the queue (it
    // said 503 for a minute).
    let job = a.admin_get(&format!("/admin/jobs/{id}")).await;
    assert_eq!(job.status, 200, "{}", job.json);
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

/// A relay with a destinations file (its adds go through the routed script)
/// answers a hung Redis as one with only `default` does (they each waited
/// the 2 s bound, one after another):
/// * adds queued behind a hung one fail with it, not a bound later (posts
///   from four senders for 4.5 s: none waits much past the bound);
/// * after that, for half a second, the next get their 503 at once: posted
///   one after another, at least every other one;
/// * so do the events of a destination a reload adds meanwhile, whose queue
///   cannot be opened (they waited on each try to open it).
///
/// The bounds checked are the timeout's half or more, not a speed.
#[tokio::test]
async fn a_hung_redis_gets_a_fast_503_with_a_destinations_file_too() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let (mut app, crm, file, _tmp) = crm_relay_then_hung(&redis, &sink).await;
    // Four senders, each posting every 25 ms for 4.5 s: the adds queued
    // behind a hung one fail with it, so none waits much past the 2 s bound
    // (each queued batch waited a bound of its own: about 4 s).
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let poster = app.poster();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(25));
                let mut worst = Duration::ZERO;
                for i in 0.. {
                    if started.elapsed() >= Duration::from_millis(4500) {
                        break;
                    }
                    tick.tick().await;
                    let asked = std::time::Instant::now();
                    let status = poster
                        .post(&event("bot-a", &format!("hung-{sender}-{i}")))
                        .await;
                    assert_eq!(status, 503, "while Redis hangs");
                    worst = worst.max(asked.elapsed());
                }
                worst
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for sender in senders {
        worst = worst.max(sender.await.expect("sender"));
    }
    assert!(
        worst >= Duration::from_millis(1500),
        "Redis hung: an add waited the bound ({worst:?})"
    );
    assert!(
        worst < Duration::from_millis(2900),
        "an add waited {worst:?}: queued behind a hung one, it waited a bound of its own"
    );
    let at_once = |label: &'static str, bot: &'static str| {
        let app = &app;
        async move {
            let mut fast = 0;
            for i in 0..6 {
                let asked = std::time::Instant::now();
                let reply = app.post_event(&event(bot, &format!("{label}-{i}"))).await;
                assert_eq!(reply.status, 503, "{}", reply.json);
                if asked.elapsed() < Duration::from_secs(1) {
                    fast += 1;
                }
            }
            fast
        }
    };
    let fast = at_once("hung", "bot-a").await;
    assert!(fast >= 2, "{fast} of 6 answered before the 2 s bound");
    let ops = format!("{crm}{}", bot_destination("ops", "bot-b", &sink));
    std::fs::write(&file, ops).expect("write");
    app.reload.send(()).await.expect("reload");
    until_refused_once_routed(&app, "bot-b").await;
    let fast = at_once("new", "bot-b").await;
    // No destination's state can be read: the list says so as a whole.
    let shown = app.admin_get("/admin/destinations").await;
    redis.hang(false);
    assert_eq!(shown.status, 503, "{}", shown.json);
    assert!(fast >= 2, "{fast} of 6 for the new destination at once");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let reply = app.post_event(&event("bot-b", "after")).await;
        if reply.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", reply.json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await.expect("clean stop");
}

/// While Redis hangs, a reload that gives three new destinations routes
/// their events within about one bound (2 s), not one per destination: the
/// shared rate limits are set side by side (they were set one after another
/// before the routing changed, 2 s each: about 8 s here).
#[tokio::test]
async fn a_reload_while_redis_hangs_routes_new_destinations_within_one_bound() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let (mut app, crm, file, _tmp) = crm_relay_then_hung(&redis, &sink).await;
    let names = ["x", "y", "z"];
    let mut text = crm.clone();
    for n in names {
        text.push_str(&bot_destination(n, &format!("bot-{n}"), &sink));
    }
    std::fs::write(&file, text).expect("write");
    let reloaded = std::time::Instant::now();
    app.reload.send(()).await.expect("reload");
    // Each sender posts its bot's events (unrouted: 200 at once) until one
    // is routed (refused, Redis hanging): when, since the reload.
    let senders: Vec<_> = names
        .iter()
        .map(|n| {
            let poster = app.poster();
            let bot = format!("bot-{n}");
            tokio::spawn(async move {
                let mut i = 0;
                wait_until(&format!("{bot} routed"), WAIT, || {
                    i += 1;
                    let (poster, bot) = (&poster, &bot);
                    async move {
                        match poster.post(&event(bot, &format!("new-{i}"))).await {
                            503 => true,
                            // (unrouted: the file is not applied yet)
                            200 => false,
                            other => panic!("{bot}: {other}"),
                        }
                    }
                })
                .await;
                reloaded.elapsed()
            })
        })
        .collect();
    let mut last = Duration::ZERO;
    for sender in senders {
        last = last.max(sender.await.expect("sender"));
    }
    redis.hang(false);
    eprintln!("the new destinations were routed {last:?} after the reload");
    assert!(
        last < Duration::from_millis(4500),
        "routed {last:?} after the reload: a bound per destination"
    );
    app.stop().await.expect("clean stop");
}

/// While Redis hangs, the queues of three destinations opened at once each
/// wait their own try (the 2 s bound), not behind the others' (one lock for
/// every queue's open: about 6 s for the last).
#[tokio::test]
async fn queues_of_different_destinations_open_side_by_side() {
    use cogrelay::queue::Queue;
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let store = std::sync::Arc::new(crate::queue_conformance::open_redis(&redis).await);
    redis.hang(true);
    let started = std::time::Instant::now();
    let opens: Vec<_> = ["x", "y", "z"]
        .into_iter()
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let name = cogrelay::destination::DestinationName::parse(n).expect("name");
                let set = store.set_rate_limit(&name, 10).await;
                (set.is_err(), started.elapsed())
            })
        })
        .collect();
    let mut last = Duration::ZERO;
    for open in opens {
        let (failed, took) = open.await.expect("open");
        assert!(failed, "Redis hangs: the open fails");
        last = last.max(took);
    }
    redis.hang(false);
    eprintln!("the last of three queues' opens failed after {last:?}");
    assert!(
        last < Duration::from_millis(3500),
        "the last open failed after {last:?}: behind the others' tries"
    );
}

/// While Redis hangs, `/metrics` reads the held keys of every destination
/// side by side and beside the counts: one bound (2 s), not one per
/// destination (five destinations took 12 s, past a scrape's default 10 s).
#[tokio::test]
async fn metrics_answer_within_one_bound_while_redis_hangs() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let file: String = ["a", "b", "c", "d", "e"]
        .into_iter()
        .map(|n| {
            format!(
                "[[destination]]\nname = \"{n}\"\nurl = \"{}\"\n",
                sink.url()
            )
        })
        .collect();
    let (mut app, _file, _tmp) = redis_relay_with_file(&redis, &sink, &file).await;
    let reply = app.post_event(&event("bot-a", "opens-every-queue")).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert!(app.metrics_text().await.contains("cogrelay_held_keys"));
    redis.hang(true);
    let started = std::time::Instant::now();
    let text = app.metrics_text().await;
    let took = started.elapsed();
    redis.hang(false);
    eprintln!("/metrics answered after {took:?} while Redis hung");
    assert!(
        text.contains("cogrelay_ingress_requests_total"),
        "the counters still render"
    );
    assert!(
        took < Duration::from_millis(5000),
        "/metrics took {took:?}: the destinations' reads one after another"
    );
    app.stop().await.expect("clean stop");
}

/// A relay on `redis` whose file (written where a reload reads it) gives
/// `crm` (bot-a's events), once it stored an event; then Redis hangs. The
/// relay, crm's table, the file's path and its directory.
async fn crm_relay_then_hung(
    redis: &crate::redis_server::RedisServer,
    sink: &Sink,
) -> (TestApp, String, std::path::PathBuf, tempfile::TempDir) {
    let crm = bot_destination("crm", "bot-a", sink);
    let (app, file, tmp) = redis_relay_with_file(redis, sink, &crm).await;
    let reply = app.post_event(&event("bot-a", "before")).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    redis.hang(true);
    (app, crm, file, tmp)
}

/// Posts events of `bot` until one is refused (503): they are unrouted
/// until a reload gives `bot` a destination, whose queue cannot be opened.
async fn until_refused_once_routed(app: &TestApp, bot: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    for i in 0.. {
        let reply = app.post_event(&event(bot, &format!("routed-{i}"))).await;
        if reply.status == 503 {
            return;
        }
        assert_eq!(reply.json["status"], "unrouted", "{}", reply.json);
        assert!(std::time::Instant::now() < deadline, "never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A destination `name` at the sink for the events of `bot`.
fn bot_destination(name: &str, bot: &str, sink: &Sink) -> String {
    format!(
        "[[destination]]\nname = \"{name}\"\nurl = \"{}\"\nbots = [\"{bot}\"]\n",
        sink.url()
    )
}

/// A file of `default` (every event) and `crm` (bot-a's), both at the sink.
fn default_and_crm(sink: &Sink) -> String {
    format!(
        "[[destination]]\nname = \"default\"\nurl = \"{}\"\n{}",
        sink.url(),
        bot_destination("crm", "bot-a", sink)
    )
}

/// A relay on `redis` with the destinations file `text`, written where a
/// reload reads it again: the relay, the file's path, and the directory.
async fn redis_relay_with_file(
    redis: &crate::redis_server::RedisServer,
    sink: &Sink,
    text: &str,
) -> (TestApp, std::path::PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = test_config(sink, tmp.path().join("data"));
    cfg.store.kind = cogrelay::config::QueueKind::Redis;
    cfg.store.redis_url = cogrelay::secret::Secret::new(redis.url());
    let file = tmp.path().join("destinations.toml");
    use_file(&mut cfg, &file, text);
    (start(cfg, sink.clone()).await, file, tmp)
}

/// On Redis, a destination whose queue cannot be opened (the file gained it
/// while Redis takes no new connection) refuses its own events, not the
/// others': its failed open does not trip the breaker every add shares.
#[tokio::test]
async fn a_destination_whose_queue_cannot_open_refuses_only_its_own_events() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let crm = bot_destination("crm", "bot-a", &sink);
    let (mut app, file, _tmp) = redis_relay_with_file(&redis, &sink, &crm).await;
    let mut conn = redis.connection().await;
    max_clients(&mut conn, None).await;
    let ops = format!("{crm}{}", bot_destination("ops", "bot-b", &sink));
    std::fs::write(&file, ops).expect("write");
    app.reload.send(()).await.expect("reload");
    until_refused_once_routed(&app, "bot-b").await;
    let taken = app.post_event(&event("bot-a", "for-crm")).await;
    // The operator sees crm, and why ops cannot be shown (was a 503 for all).
    let shown = app.admin_get("/admin/destinations").await;
    max_clients(&mut conn, Some(10_000)).await;
    assert_eq!(taken.status, 200, "{}", taken.json);
    assert_eq!(shown.status, 200, "{}", shown.json);
    let row = |name: &str| {
        shown
            .json
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert!(row("crm")["counts"]["waiting"].is_u64(), "{}", shown.json);
    assert!(row("crm").get("error").is_none(), "{}", shown.json);
    assert!(
        row("ops")["error"]
            .as_str()
            .is_some_and(|e| e.contains("queue unavailable")),
        "{}",
        shown.json
    );
    assert!(
        row("ops")["counts"].is_null() && row("ops")["held_keys"].is_null(),
        "unknown, not zero: {}",
        shown.json
    );
    assert!(sink.wait_for(1, WAIT).await, "crm delivered");
    app.stop().await.expect("clean stop");
}

/// On Redis, an event one of whose queues a tool broke (a `concurrency` in
/// its meta that is not a number) is refused whole, before any write: none
/// of its jobs is kept without its dedup record, so its resend, once the
/// queue is mended, is stored and delivered once per destination; so is one
/// whose queue has a key of another type. Other events are not refused with
/// it, nor with a script that fails: an error Redis answered is not "Redis
/// down", which opens the breaker.
#[tokio::test]
async fn an_event_for_a_queue_a_tool_broke_is_refused_whole_and_alone() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let (mut app, _file, _tmp) =
        redis_relay_with_file(&redis, &sink, &default_and_crm(&sink)).await;
    let mut conn = redis.connection().await;
    let queue = &app.config.store.queue_name;
    let crm_meta = format!("bull:{queue}.crm:meta");
    let counter = format!("bull:{queue}:id");
    let ids_given = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let counter = counter.clone();
        async move {
            redis::cmd("GET")
                .arg(&counter)
                .query_async::<Option<u64>>(&mut conn)
                .await
                .expect("get")
                .unwrap_or(0)
        }
    };
    // crm's queue exists once it took an event.
    let first = app.post_event(&event("bot-a", "before")).await;
    assert_eq!(first.status, 200, "{}", first.json);
    let _: () = redis::cmd("HSET")
        .arg(&crm_meta)
        .arg("concurrency")
        .arg("five")
        .query_async(&mut conn)
        .await
        .expect("hset");
    let before = ids_given(&mut conn).await;
    let both = event("bot-a", "both");
    let refused = app.post_event(&both).await;
    let given = ids_given(&mut conn).await;
    // Right after it: an event for `default` alone is taken.
    let other = app.post_event(&event("bot-b", "default-only")).await;
    assert_eq!(refused.status, 503, "{}", refused.json);
    assert_eq!(
        given, before,
        "the refused event wrote jobs (ids {before} to {given}): its default job was kept"
    );
    assert_eq!(other.status, 200, "{}", other.json);
    let _: () = redis::cmd("HDEL")
        .arg(&crm_meta)
        .arg("concurrency")
        .query_async(&mut conn)
        .await
        .expect("hdel");
    let again = app.post_event(&both).await;
    assert_eq!(again.status, 200, "{}", again.json);
    assert_eq!(again.json["status"], "accepted", "{}", again.json);
    // before (2 jobs), default-only (1), both (2).
    assert!(sink.wait_for(5, WAIT).await, "delivered: {}", sink.posts());
    assert_eq!(
        ids_given(&mut conn).await,
        before + 3,
        "one job per destination"
    );
    // A key of crm's queue a tool made another type: refused the same way,
    // before any write (it failed the script midway, after default's job).
    let events_key = format!("bull:{queue}.crm:events");
    crate::redis_server::break_key(&mut conn, &events_key).await;
    let before = ids_given(&mut conn).await;
    let wrong_type = event("bot-a", "wrong-type");
    let refused = app.post_event(&wrong_type).await;
    assert_eq!(refused.status, 503, "{}", refused.json);
    assert_eq!(ids_given(&mut conn).await, before, "nothing written");
    crate::redis_server::mend_key(&mut conn, &events_key).await;
    let again = app.post_event(&wrong_type).await;
    assert_eq!(again.json["status"], "accepted", "{}", again.json);
    wait_until("the resend delivered to both", WAIT, || async {
        let ids = received_ids(&sink);
        ids.iter().filter(|id| *id == "wrong-type").count() == 2
    })
    .await;
    // A dedup record a tool made another type fails the script itself (it
    // is not checked first): that event is refused, and the next event for
    // `default` alone is not (Redis answered: no breaker).
    let _: () = redis::cmd("RPUSH")
        .arg(format!("bull:{queue}:de:cognigy-bot-a-broken-record"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .expect("rpush");
    let failed = app.post_event(&event("bot-a", "broken-record")).await;
    let other = app.post_event(&event("bot-b", "default-only-2")).await;
    assert_eq!(failed.status, 503, "{}", failed.json);
    assert_eq!(
        other.status, 200,
        "Redis answered: no breaker: {}",
        other.json
    );
    app.stop().await.expect("clean stop");
}

/// On Redis, a destination whose state cannot be read (a key of its queue a
/// tool made another type) is a row with its error, in `GET
/// /admin/destinations` and in `cogrelay destinations`: the others are
/// still shown (the command failed as a whole).
#[tokio::test]
async fn a_destination_that_cannot_be_read_is_a_row_with_its_error_in_the_command_too() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let (mut app, _file, _tmp) =
        redis_relay_with_file(&redis, &sink, &default_and_crm(&sink)).await;
    let taken = app.post_event(&event("bot-a", "both")).await;
    assert_eq!(taken.status, 200, "{}", taken.json);
    wait_until("both jobs completed", WAIT, || async {
        let shown = app.admin_get("/admin/destinations").await.json;
        shown
            .as_array()
            .is_some_and(|rows| rows.iter().all(|d| d["counts"]["completed"] == 1))
    })
    .await;
    let mut conn = redis.connection().await;
    let queue = app.config.store.queue_name.clone();
    let _: () = redis::cmd("SET")
        .arg(format!("bull:{queue}.crm:wait"))
        .arg("not a list")
        .query_async(&mut conn)
        .await
        .expect("set");
    let shown = app.admin_get("/admin/destinations").await;
    assert_eq!(shown.status, 200, "{}", shown.json);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cogrelay"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COGRELAY_QUEUE", "redis")
            .env("REDIS_URL", redis.url())
            .env("QUEUE_NAME", &queue)
            .output()
            .expect("run")
    };
    for out in [cli(&["destinations", "--json"]), cli(&["destinations"])] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let Ok(rows) = serde_json::from_str::<serde_json::Value>(&stdout) else {
            // The table: default's row, crm's with `?`, and why.
            assert!(
                stdout.lines().any(|l| l.starts_with("default ")),
                "{stdout}"
            );
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with("crm ") && l.contains('?')),
                "{stdout}"
            );
            assert!(
                stdout.contains("unreadable: crm: ") && stdout.contains("WRONGTYPE"),
                "{stdout}"
            );
            continue;
        };
        let row = |name: &str| {
            rows.as_array()
                .into_iter()
                .flatten()
                .find(|d| d["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(row("default")["counts"]["completed"], 1, "{rows}");
        assert!(row("crm")["counts"].is_null(), "{rows}");
        assert!(
            row("crm")["error"]
                .as_str()
                .is_some_and(|e| e.contains("WRONGTYPE")),
            "{rows}"
        );
    }
    app.stop().await.expect("clean stop");
}

/// Sets Redis's `maxclients` to `n`, or (None) to the clients connected now:
/// it then takes no new connection.
async fn max_clients(conn: &mut redis::aio::MultiplexedConnection, n: Option<u64>) {
    let n = match n {
        Some(n) => n,
        None => {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query_async(conn)
                .await
                .expect("info");
            info.lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|n| n.trim().parse().ok())
                .expect("connected_clients")
        }
    };
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(n)
        .query_async(conn)
        .await
        .expect("maxclients");
}

/// How late a thread that asks to wake every 5 ms is woken, at most, while
/// it is watched: what a busy machine makes every thread of the relays wait.
struct Lag {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl Lag {
    fn watch() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let tick = Duration::from_millis(5);
            let mut worst = Duration::ZERO;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = std::time::Instant::now();
                std::thread::sleep(tick);
                worst = worst.max(asked.elapsed().saturating_sub(tick));
            }
            worst
        });
        Self { stop, thread }
    }

    /// The worst lateness seen, in whole milliseconds (rounded up).
    fn worst_ms(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst = self.thread.join().expect("lag thread");
        worst.as_micros().div_ceil(1000) as u64
    }
}

/// The starts a second may gain at `per_second` when the machine ran
/// `late_ms` late (what [`Lag`] saw): one every `1000 / per_second` ms.
fn late_starts(late_ms: u64, per_second: u64) -> usize {
    (late_ms * per_second).div_ceil(1000) as usize
}

/// `n` relays on `redis` whose file gives `crm`, then one whose file gives
/// `extra` too, started last, and one event's job at `extra` failed (a 422):
/// the relays (that one last), the failed job's id, and the two sinks.
async fn dead_letter_of_extra(
    redis: &crate::redis_server::RedisServer,
    n: usize,
) -> (Vec<(TestApp, tempfile::TempDir)>, String, (Sink, Sink)) {
    let sink = Sink::start().await.expect("sink");
    let gone = Sink::start().await.expect("sink");
    gone.set_default(Behaviour::status(422));
    let crm = format!(
        "[[destination]]\nname = \"crm\"\nurl = \"{}\"\n",
        sink.url()
    );
    let mut apps = relays_on_redis(n, redis, &sink, &crm).await;
    let extra = format!(
        "{crm}[[destination]]\nname = \"extra\"\nurl = \"{}\"\nattempts = 1\n",
        gone.url()
    );
    apps.extend(relays_on_redis(1, redis, &sink, &extra).await);
    let last = &apps[n].0;
    let reply = last.post_event(&event("bot", "only-extra-fails")).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    let id = reply.json["jobs"]["extra"]
        .as_str()
        .expect("extra's job")
        .to_string();
    last.wait_counts(WAIT, |c| c["failed"] == 1 && c["completed"] == 1)
        .await;
    (apps, id, (sink, gone))
}

/// `n` relays in this process on `redis`, with the destinations `file`.
async fn relays_on_redis(
    n: usize,
    redis: &crate::redis_server::RedisServer,
    sink: &Sink,
    file: &str,
) -> Vec<(TestApp, tempfile::TempDir)> {
    let mut apps = Vec::new();
    for _ in 0..n {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut cfg = test_config(sink, tmp.path().join("data"));
        // Every completed job kept: the rate tests read their attempts.
        cfg.store.retention.remove_on_complete = 10_000;
        cfg.store.kind = cogrelay::config::QueueKind::Redis;
        cfg.store.redis_url = cogrelay::secret::Secret::new(redis.url());
        let globals = Globals {
            delivery: cfg.delivery.clone(),
            lock_duration: cfg.pool.lock_duration,
        };
        let list = destinations::parse(file, "test.toml", &globals, &|_| None).expect("valid");
        cfg.destinations_file = Some(DestinationSet {
            list,
            file: Some("test.toml".into()),
        });
        apps.push((start(cfg, sink.clone()).await, tmp));
    }
    apps
}

/// The most attempts at `destination` that started within one second, from
/// the relay's own record of each attempt: its completed jobs, read page by
/// page, which must hold `attempts` attempts at least (the sink's receive
/// times bunch up when the machine is starved, and once showed 1,109 at
/// 1,000 a second; a starved machine also times some attempts out, and their
/// retries are starts too).
async fn busiest_second_started(app: &TestApp, destination: &str, attempts: usize) -> usize {
    // The target may have every request before the last results are recorded.
    wait_until(
        "every attempt in the completed jobs",
        Duration::from_secs(20),
        || async { completed_attempts_started(app, destination).await.len() >= attempts },
    )
    .await;
    let mut at = completed_attempts_started(app, destination).await;
    assert!(
        at.len() >= attempts,
        "every attempt is in the completed jobs"
    );
    // The longest run of starts within 1,000 ms of its first.
    at.sort_unstable();
    let mut first = 0;
    (0..at.len())
        .map(|last| {
            while at[last] - at[first] >= 1000 {
                first += 1;
            }
            last - first + 1
        })
        .max()
        .unwrap_or(0)
}

/// When each attempt of `destination`'s completed jobs started, read page by page.
async fn completed_attempts_started(app: &TestApp, destination: &str) -> Vec<i64> {
    let mut at = Vec::new();
    let mut offset = 0;
    loop {
        let page = admin_json(
            app,
            &format!(
                "/admin/jobs?destination={destination}&state=completed&offset={offset}&limit=500"
            ),
        )
        .await;
        let items = page["items"].as_array().expect("items");
        at.extend(
            items
                .iter()
                .flat_map(|j| j["attempts"].as_array().cloned().unwrap_or_default())
                .map(|a| a["startedAtMs"].as_i64().expect("startedAtMs")),
        );
        offset += items.len();
        if items.is_empty() || offset as u64 >= page["total"].as_u64().expect("total") {
            return at;
        }
    }
}

/// The most requests `sink` got within any one second.
fn busiest_second(sink: &Sink) -> usize {
    let at: Vec<std::time::Instant> = sink.received().iter().map(|r| r.at).collect();
    at.iter()
        .map(|t0| {
            at.iter()
                .filter(|t| **t >= *t0 && t.duration_since(*t0) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// On Redis the rate limit holds over every relay: two relays sharing a
/// destination limited to 20/s never send it more than 21 in any second (5%).
#[tokio::test]
async fn a_rate_limit_holds_over_two_relays_on_redis() {
    let Some(redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let file = format!(
        "[[destination]]\nname = \"limited\"\nurl = \"{}\"\nrate_limit = 20\nconcurrency = 8\n",
        sink.url()
    );
    let apps = relays_on_redis(2, &redis, &sink, &file).await;
    let n = 60;
    let lag = Lag::watch();
    for i in 0..n {
        let reply = apps[i % 2]
            .0
            .post_event(&event("bot", &format!("rl2-{i}")))
            .await;
        assert_eq!(reply.status, 200);
    }
    assert!(
        sink.wait_for(n, Duration::from_secs(20)).await,
        "{} of {n}",
        sink.count()
    );
    // When each attempt started, as the relays recorded it (either relay's
    // admin lists the shared queue's jobs): the sink's receive times bunch
    // up when the machine is starved, and once showed 21.
    let late_ms = lag.worst_ms();
    let most = busiest_second_started(&apps[0].0, "limited", n).await;
    // The shared limit spaces claims 50 ms apart and holds within the 5% it
    // promises (`limit_shape`, docs/destinations.md): an attempt's start is
    // recorded a moment after its claim, and with 100 tests running beside
    // it one late record made 21; each start a late machine may bunch is
    // allowed too.
    let allowed = 21 + late_starts(late_ms, 20);
    assert!(
        most <= allowed,
        "{most} requests within one second over two relays (the machine ran up to {late_ms} ms late)"
    );
    // Not 1 or 2 a second: a relay that rests a whole idle second between
    // claims (a bug this caught) would show that, whatever the machine's load.
    assert!(
        most >= 6,
        "the limit is used ({most} in the busiest second)"
    );
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

/// 1,000 a second over two relays on Redis: no second holds more than 5%
/// over the limit, and the limit is used (on 27e726d the shared limit was
/// one job every 2 ms at this rate: at most 500 a second). An attempt starts
/// a moment after its claim, later on a starved machine (a full test run on
/// two cores once made 1,079): each millisecond the machine ran late during
/// the drain is allowed one more start ([`late_starts`]).
#[tokio::test]
async fn a_rate_limit_of_1000_a_second_holds_over_two_relays_on_redis() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let file = format!(
        "[[destination]]\nname = \"fast\"\nurl = \"{}\"\nrate_limit = 1000\nconcurrency = 64\n",
        sink.url()
    );
    let apps = relays_on_redis(2, &redis, &sink, &file).await;
    // Paused while the backlog is stored, so that the limit, not the
    // ingest, sets the pace once resumed.
    let pause = apps[0].0.admin_post("/admin/destinations/fast/pause").await;
    assert_eq!(pause.status, 200);
    let n = 4000;
    let lag = Lag::watch();
    let mut sends = tokio::task::JoinSet::new();
    for k in 0..8 {
        let poster = apps[k % 2].0.poster();
        sends.spawn(async move {
            for i in (k..n).step_by(8) {
                assert_eq!(poster.post(&event("bot", &format!("fast-{i}"))).await, 200);
            }
        });
    }
    while let Some(r) = sends.join_next().await {
        r.expect("sender");
    }
    let resume = apps[0]
        .0
        .admin_post("/admin/destinations/fast/resume")
        .await;
    assert_eq!(resume.status, 200);
    assert!(
        sink.wait_for(n, Duration::from_secs(60)).await,
        "{} of {n}",
        sink.count()
    );
    let late_ms = lag.worst_ms();
    // When each attempt started, as the relays recorded it.
    let most = busiest_second_started(&apps[0].0, "fast", n).await;
    let allowed = 1050 + late_starts(late_ms, 1000);
    eprintln!("rate limit 1000/s over two relays: {most} in the busiest second (allowed {allowed}: the machine ran up to {late_ms} ms late)");
    assert!(
        most <= allowed,
        "{most} requests within one second over two relays (the machine ran up to {late_ms} ms late)"
    );
    assert!(
        most > 500,
        "the limit is used ({most} in the busiest second)"
    );
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

both_backends! {
    /// A pause is honoured at once (SPEC §7): with one worker, a target
    /// that takes 0.5 s and 8 events (handed over, held and in flight), no
    /// attempt starts once the pause is answered; the one in flight ends,
    /// the others wait in the store unleased; a resume delivers them, each
    /// once (on 27e726d, 7 more attempts started after the pause).
    async fn once_a_pause_is_answered_no_attempt_starts(b: Backend) {
        let mut app = spawn_app_on(b, |c| c.delivery.concurrency = 1).await;
        app.sink
            .set_default(Behaviour::Delay(Duration::from_millis(500), 200));
        for i in 0..8 {
            assert_eq!(app.post_event(&event("bot", &format!("p-{i}"))).await.status, 200);
        }
        assert!(app.sink.wait_for(1, WAIT).await, "one in flight");
        let (status, _) = admin_post(&app, "/admin/destinations/default/pause").await;
        assert_eq!(status, 200);
        let at_answer = app.sink.posts();
        // Settled: nothing leased any more (the one in flight finished, the
        // rest given back), so nothing can start.
        let q = app
            .wait_counts(WAIT, |c| c["active"] == 0 && c["completed"].as_u64().unwrap_or(0) + c["waiting"].as_u64().unwrap_or(0) == 8)
            .await;
        assert_eq!(
            app.sink.posts(),
            at_answer,
            "an attempt started after the pause was answered: {q}"
        );
        assert!(at_answer <= 2, "{at_answer} started before the pause");
        let (status, _) = admin_post(&app, "/admin/destinations/default/resume").await;
        assert_eq!(status, 200);
        app.wait_counts(Duration::from_secs(30), |c| c["completed"] == 8).await;
        assert_eq!(app.sink.posts(), 8, "each once");
        app.stop().await.expect("clean stop");
    }
}

/// A reload tells every old pool to stop at once: once a delivery with the
/// new settings went out, none with the old ones starts, at either of two
/// destinations (on 27e726d the old pools were stopped one after another,
/// each waiting for the last one's drain, and the later ones kept starting
/// deliveries with the old headers meanwhile).
#[tokio::test]
async fn a_reload_stops_every_old_pool_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cogrelay.toml");
    let second = Sink::start().await.expect("sink");
    let text = |version: u32, first: &str| {
        format!(
            "[[destination]]\nname = \"d1\"\nurl = \"{first}\"\nconcurrency = 2\nheaders = {{ \"X-Version\" = \"{version}\" }}\n\
             [[destination]]\nname = \"d2\"\nurl = \"{}\"\nconcurrency = 2\nheaders = {{ \"X-Version\" = \"{version}\" }}\n",
            second.url()
        )
    };
    let mut app = spawn_app_with(|c| {
        c.store.retention.remove_on_complete = 10_000;
        let t = text(1, c.delivery.target.as_ref());
        c.destinations_file = Some(destinations_of(c, &t));
        c.destinations_file.as_mut().expect("file").file = Some(dir.path().join("cogrelay.toml"));
    })
    .await;
    let first_url = app.sink.url();
    std::fs::write(&file, text(1, &first_url)).expect("write");
    for sink in [&app.sink, &second] {
        sink.set_default(Behaviour::Delay(Duration::from_millis(300), 200));
    }
    let sending = {
        let poster = app.poster();
        tokio::spawn(async move {
            for i in 0..60 {
                assert_eq!(poster.post(&event("bot", &format!("v-{i}"))).await, 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    assert!(second.wait_for(2, WAIT).await, "deliveries under way");
    std::fs::write(&file, text(2, &first_url)).expect("write");
    app.reload.send(()).await.expect("reload");
    sending.await.expect("sender");
    app.wait_counts(Duration::from_secs(60), |c| c["completed"] == 120)
        .await;
    for (name, sink) in [("d1", &app.sink), ("d2", &second)] {
        let versions: Vec<String> = sink
            .received()
            .iter()
            .map(|r| r.header("x-version").unwrap_or("-").to_string())
            .collect();
        let first_new = versions
            .iter()
            .position(|v| v == "2")
            .expect("new settings");
        let old_after = versions[first_new..].iter().filter(|v| *v == "1").count();
        assert!(
            old_after <= 1,
            "{name}: {old_after} deliveries with the old settings started after one with the new: {versions:?}"
        );
    }
    app.stop().await.expect("clean stop");
}

/// Two relays of one Redis queue whose files give `crm` two URLs (its
/// events split between them, unseen) are told: each counts the other in
/// `cogrelay_destination_url_conflicts` (the second at its start, the
/// first at its next look, here after a reload), and neither once the
/// files agree. A relay that stops takes its word out of Redis.
#[tokio::test]
async fn relays_of_one_queue_that_give_a_destination_two_urls_are_told() {
    if !crate::redis_server::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let first_file = dir.path().join("first.toml");
    let second_file = dir.path().join("second.toml");
    let crm =
        |url: &dyn std::fmt::Display| format!("[[destination]]\nname = \"crm\"\nurl = \"{url}\"\n");
    let mut first = spawn_app_on(Backend::Redis, |c| {
        let text = crm(&c.delivery.target);
        use_file(c, &first_file, &text);
    })
    .await;
    let first_url = first.config.delivery.target.clone();
    let sink = Sink::start().await.expect("sink");
    let mut cfg = test_config(&sink, dir.path().join("second-data"));
    cfg.store.kind = cogrelay::config::QueueKind::Redis;
    cfg.store.redis_url = first.config.store.redis_url.clone();
    let text = crm(&cfg.delivery.target);
    use_file(&mut cfg, &second_file, &text);
    let mut second = start(cfg, sink).await;
    for (app, who) in [(&second, "the second, at its start"), (&first, "the first")] {
        if who == "the first" {
            first.reload.send(()).await.expect("reload");
        }
        wait_until(who, WAIT, || async { url_conflicts(app).await == Some(1) }).await;
    }
    std::fs::write(&second_file, crm(&first_url)).expect("write");
    for app in [&second, &first] {
        app.reload.send(()).await.expect("reload");
        wait_until("the files agree", WAIT, || async {
            url_conflicts(app).await == Some(0)
        })
        .await;
    }
    let key = format!("bull:{}:cg:target:crm", first.config.store.queue_name);
    let mut conn = first.redis.as_ref().expect("redis").connection().await;
    let relays = |conn: &mut redis::aio::MultiplexedConnection| {
        let (key, mut conn) = (key.clone(), conn.clone());
        async move {
            let n: usize = redis::cmd("HLEN")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("hlen");
            n
        }
    };
    assert_eq!(relays(&mut conn).await, 2);
    second.stop().await.expect("stop");
    assert_eq!(relays(&mut conn).await, 1, "the stopped relay's word");
    first.stop().await.expect("stop");
}

/// `crm`'s `cogrelay_destination_url_conflicts`, if shown.
async fn url_conflicts(app: &TestApp) -> Option<i64> {
    let text = app.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix("cogrelay_destination_url_conflicts{destination=\"crm\"} "))
        .and_then(|v| v.trim().parse().ok())
}
