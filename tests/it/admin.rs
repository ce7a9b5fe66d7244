//! SPEC §3.6: the dead-letter view (paginated listing with attempt history),
//! retry one, retry all, remove; health and readiness; admin token.

use std::time::Duration;

use cogrelay::secret::Secret;
use serde_json::Value;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

async fn fail_n(app: &TestApp, n: usize) -> Vec<String> {
    app.sink.set_default(Behaviour::status(500));
    let mut ids = Vec::new();
    for i in 0..n {
        let r = app.post_event(&event("bot", &format!("dl-{i}"))).await;
        ids.push(r.json["jobId"].as_str().expect("id").to_string());
    }
    app.wait_counts(WAIT, |c| c["failed"] == n as u64).await;
    ids
}

both_backends! {
async fn failed_jobs_are_listed_with_total_pagination_and_history(b: Backend) {
    let app = spawn_app_on(b, |c| c.delivery.attempts = 2).await;
    let ids = fail_n(&app, 7).await;

    let mut seen = Vec::new();
    for offset in [0, 3, 6] {
        let page = app
            .admin_get(&format!("/admin/jobs?state=failed&offset={offset}&limit=3"))
            .await;
        assert_eq!(page.status, 200);
        assert_eq!(page.json["total"], 7);
        assert_eq!(page.json["offset"], offset);
        assert_eq!(page.json["limit"], 3);
        for item in page.json["items"].as_array().expect("items") {
            assert_eq!(item["state"], "failed");
            let attempts = item["attempts"].as_array().expect("history");
            assert_eq!(attempts.len(), 2, "{item}");
            assert_eq!(attempts[0]["status"], 500);
            assert!(item["failedReason"].is_string());
            seen.push(item["id"].as_str().expect("id").to_string());
        }
    }
    assert_eq!(seen.len(), 7, "three pages cover every job once");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 7);
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected);

    let one = app.admin_get(&format!("/admin/jobs/{}", ids[0])).await;
    assert_eq!(one.json["payload"]["text"], "hello dl-0");
    assert_eq!(one.json["eventKey"], "cognigy-bot-dl-0");
}

async fn limit_and_state_are_validated(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    for q in [
        "limit=0",
        "limit=501",
        "limit=x",
        "offset=-1",
        "state=bogus",
    ] {
        let r = app.admin_get(&format!("/admin/jobs?{q}")).await;
        assert_eq!(r.status, 400, "{q}");
        assert!(r.json["error"].is_string());
    }
    assert_eq!(app.admin_get("/admin/jobs?limit=500").await.status, 200);
    // A parameter given twice: a JSON 400 that names it, as every other 400.
    for path in [
        "/admin/jobs?state=failed&state=completed",
        "/admin/jobs?limit=1&limit=2",
    ] {
        let r = app.admin_get(path).await;
        assert_eq!(r.status, 400, "{path}");
        let msg = r.json["error"].as_str().unwrap_or_default();
        assert!(msg.contains("duplicate field"), "{path}: {:?}", r.json);
    }
    let r = app.admin_post("/admin/jobs/retry?state=failed&state=failed").await;
    assert_eq!(r.status, 400);
    assert!(r.json["error"].is_string(), "{:?}", r.json);
    // A wrong method: a JSON 405 with the methods the route takes.
    let r = app.admin_delete("/admin/queue").await;
    assert_eq!(r.status, 405);
    assert!(r.json["error"].as_str().unwrap_or_default().contains("DELETE"));
    assert_eq!(r.headers["allow"], "GET,HEAD");
    // A path that is not UTF-8: a JSON 400 too.
    let r = app.admin_get("/admin/jobs/%FF").await;
    assert_eq!(r.status, 400);
    assert!(r.json["error"].as_str().unwrap_or_default().contains("UTF-8"), "{:?}", r.json);
    assert_eq!(app.admin_get("/admin/jobs/999").await.status, 404);
    assert_eq!(app.admin_get("/admin/jobs/not-a-number").await.status, 404);
    // Names of the queue's own keys are no jobs: on Redis a remove of
    // `meta` deleted the meta hash (the pause went with it), and `id` (a
    // counter) or `events` (a stream) answered 503.
    assert_eq!(
        app.admin_post("/admin/destinations/default/pause").await.status,
        200
    );
    for id in ["meta", "id", "events", "wait", "completed", "waiting-children", "de:x", "cg:lastid", "1:logs"] {
        let path = format!("/admin/jobs/{}", id.replace(':', "%3A"));
        assert_eq!(app.admin_get(&path).await.status, 404, "GET {id}");
        assert_eq!(app.admin_delete(&path).await.status, 404, "DELETE {id}");
        let retry = app.admin_post(&format!("{path}/retry")).await;
        assert_eq!(retry.status, 404, "retry {id}");
    }
    let listed = app.admin_get("/admin/destinations").await.json;
    assert_eq!(listed[0]["paused"], true, "{listed}");
}

async fn retry_one_and_retry_all_deliver_once_the_target_recovers(b: Backend) {
    let app = spawn_app_on(b, |c| c.delivery.attempts = 1).await;
    let ids = fail_n(&app, 3).await;
    app.sink.set_default(Behaviour::status(200));
    let before = app.sink.count();

    let r = app
        .admin_post(&format!("/admin/jobs/{}/retry", ids[0]))
        .await;
    assert_eq!(r.status, 200);
    let job = app.wait_job(&ids[0], "completed", WAIT).await;
    assert_eq!(job["attemptsMade"], 1, "attempts were reset");
    let r = app
        .admin_post(&format!("/admin/jobs/{}/retry", ids[0]))
        .await;
    assert_eq!(r.status, 409, "only failed jobs can be retried");

    let r = app.admin_post("/admin/jobs/retry?state=failed").await;
    assert_eq!(r.json["retried"], 2);
    app.wait_counts(WAIT, |c| c["failed"] == 0 && c["completed"] == 3)
        .await;
    assert_eq!(app.sink.count(), before + 3);
    let last = app.sink.received().pop().expect("delivery");
    assert_eq!(last.header("x-delivery-attempt"), Some("1"));
}

/// A retry told to the admin is claimed at once: the pool is woken, not left
/// to find the job at its next idle look at the store (here 10 minutes).
async fn an_admin_retry_wakes_the_pool(b: Backend) {
    let app = spawn_app_on(b, |c| {
        c.delivery.attempts = 1;
        c.pool.idle_poll = Duration::from_secs(600);
    })
    .await;
    let ids = fail_n(&app, 3).await;
    app.sink.set_default(Behaviour::status(200));
    let r = app
        .admin_post(&format!("/admin/jobs/{}/retry", ids[0]))
        .await;
    assert_eq!(r.status, 200);
    app.wait_job(&ids[0], "completed", WAIT).await;
    // A misspelt or empty filter is refused and retries nothing (it retried
    // every destination's dead letters); a listing refuses them too.
    for path in [
        "/admin/jobs/retry?state=failed&destinaton=default",
        "/admin/jobs/retry?state=failed&destination=",
        "/admin/jobs/retry?state=failed&destination=%20",
    ] {
        let r = app.admin_post(path).await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.json);
        assert!(r.json["error"].is_string(), "{path}: {:?}", r.json);
    }
    for path in ["/admin/jobs?status=failed", "/admin/jobs?destination="] {
        let r = app.admin_get(path).await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.json);
    }
    assert_eq!(app.admin_get("/admin/queue").await.json["failed"], 2);
    // An id is written one way on both backends: `01` or `+1` is no job.
    for id in [format!("0{}", ids[1]), format!("%2B{}", ids[1])] {
        let r = app.admin_get(&format!("/admin/jobs/{id}")).await;
        assert_eq!(r.status, 404, "{id}: {:?}", r.json);
    }
    let r = app
        .admin_post("/admin/jobs/retry?state=failed&destination=%20default")
        .await;
    assert_eq!(r.json["retried"], 2, "a name's spaces trimmed, as a listing's");
    assert!(r.json.get("warning").is_none(), "{:?}", r.json);
    app.wait_counts(WAIT, |c| c["failed"] == 0 && c["completed"] == 3)
        .await;
}

async fn remove_deletes_a_job(b: Backend) {
    let app = spawn_app_on(b, |c| c.delivery.attempts = 1).await;
    let ids = fail_n(&app, 2).await;
    let r = app.admin_delete(&format!("/admin/jobs/{}", ids[1])).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.admin_get(&format!("/admin/jobs/{}", ids[1]))
            .await
            .status,
        404
    );
    let page = app.admin_get("/admin/jobs?state=failed").await;
    assert_eq!(page.json["total"], 1);
    assert_eq!(
        app.admin_delete(&format!("/admin/jobs/{}", ids[1]))
            .await
            .status,
        404
    );
}

async fn health_ready_and_queue_counts(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    assert_eq!(app.admin_get("/healthz").await.status, 200);
    assert_eq!(app.admin_get("/readyz").await.status, 200);
    let c = app.admin_get("/admin/queue").await.json;
    for key in ["waiting", "active", "delayed", "completed", "failed"] {
        assert_eq!(c[key], 0, "{key} in {c}");
    }
}

/// Retry-all moves every failed job, more than one batch of them, each with
/// its attempts reset (delivered as attempt 1), and answers how many moved.
async fn retry_all_resets_every_job_and_counts_what_moved(b: Backend) {
    const N: usize = 1200;
    let app = std::sync::Arc::new(spawn_app_on(b, |c| c.delivery.attempts = 1).await);
    app.sink.set_default(Behaviour::status(500));
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..N {
        let (app, limit) = (app.clone(), limit.clone());
        sends.spawn(async move {
            let _p = limit.acquire_owned().await.expect("permit");
            app.post_event(&event("bot", &format!("ra-{i}"))).await.status
        });
    }
    while let Some(s) = sends.join_next().await {
        assert_eq!(s.expect("task"), 200);
    }
    app.wait_counts(Duration::from_secs(60), |c| c["failed"] == N as u64).await;
    app.sink.set_default(Behaviour::status(200));
    let first_round = app.sink.count();
    let r = app.admin_post("/admin/jobs/retry?state=failed").await;
    assert_eq!(r.json["retried"], N as u64, "{}", r.json);
    let c = app
        .wait_counts(Duration::from_secs(60), |c| c["completed"].as_u64().unwrap_or(0) >= 100 && c["failed"] == 0 && c["waiting"] == 0 && c["active"] == 0 && c["delayed"] == 0)
        .await;
    assert_eq!(c["failed"], 0, "{c}");
    assert!(app.sink.wait_for(first_round + N, Duration::from_secs(60)).await);
    let again = &app.sink.received()[first_round..];
    assert_eq!(again.len(), N);
    assert!(
        again.iter().all(|r| r.header("x-delivery-attempt") == Some("1")),
        "every retried job starts again at attempt 1"
    );
}

async fn admin_token_is_required_when_set(b: Backend) {
    let app = spawn_app_on(b, |c| c.admin.token = Some(Secret::new("adm-tok"))).await;
    let refused = app.admin_get("/admin/queue").await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.headers["www-authenticate"],
        "Bearer realm=\"cogrelay admin\""
    );
    assert_eq!(
        app.admin_get("/healthz").await.status,
        200,
        "probes stay open"
    );
    let ok = app
        .admin_as(reqwest::Method::GET, "/admin/queue", "adm-tok")
        .await;
    assert_eq!(ok.status(), 200);
    let v: Value = serde_json::from_slice(&ok.bytes().await.expect("body")).expect("json");
    assert_eq!(v["failed"], 0);
    let with = |auth: &'static str| {
        app.http
            .get(format!("http://{}/admin/queue", app.admin))
            .header("authorization", auth)
            .send()
    };
    for wrong in ["Bearer adm-tok2", "Bearer adm-to", "Bearer ", "Basic adm-tok", "adm-tok"] {
        assert_eq!(with(wrong).await.expect("send").status(), 401, "{wrong}");
    }
    assert_eq!(
        with("bearer adm-tok").await.expect("send").status(),
        200,
        "the scheme in any case"
    );
    assert_eq!(with("BEARER adm-tok").await.expect("send").status(), 200);
    // A wrong method or a path it cannot read asks for the token first.
    assert_eq!(app.admin_delete("/admin/queue").await.status, 401);
    assert_eq!(app.admin_get("/admin/jobs/%FF").await.status, 401);
}

/// Without ADMIN_TOKEN, no web page may drive or read the admin API: every
/// route that reads jobs or changes anything answers 403 to a foreign
/// `Origin`, a cross-site fetch, or a `Host` that is not the admin's own.
async fn without_a_token_only_the_admins_own_origin_gets_in(b: Backend) {
    let app = spawn_app_on(b, |c| c.delivery.attempts = 1).await;
    app.sink.push(Behaviour::status(500));
    let id = app.post_event(&event("bot", "csrf-1")).await.json["jobId"]
        .as_str()
        .expect("id")
        .to_string();
    app.wait_job(&id, "failed", Duration::from_secs(10)).await;
    let base = format!("http://{}", app.admin);
    let own = format!("http://{}", app.admin);
    let localhost = format!("localhost:{}", app.admin.port());
    let routes: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::GET, "/admin/queue".into()),
        (reqwest::Method::GET, "/admin/jobs?state=failed".into()),
        (reqwest::Method::GET, format!("/admin/jobs/{id}")),
        (reqwest::Method::POST, format!("/admin/jobs/{id}/retry")),
        (reqwest::Method::POST, "/admin/jobs/retry?state=failed".into()),
        (reqwest::Method::DELETE, format!("/admin/jobs/{id}")),
    ];
    let foreign: [(&str, &str); 5] = [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("origin", "http://localhost:1"),
        ("sec-fetch-site", "cross-site"),
        ("host", "evil.example"),
    ];
    for (method, path) in &routes {
        for (name, value) in foreign {
            let r = app
                .http
                .request(method.clone(), format!("{base}{path}"))
                .header(name, value)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 403, "{method} {path} with {name}: {value}");
        }
    }
    let c = app.admin_get("/admin/queue").await.json;
    assert_eq!(c["failed"], 1, "nothing was retried or removed: {c}");
    // The admin's own origin, through its address or localhost, gets in.
    for (host, origin) in [(app.admin.to_string(), own.clone()), (localhost.clone(), format!("http://{localhost}"))] {
        let r = app
            .http
            .get(format!("{base}/admin/jobs?state=failed"))
            .header("host", &host)
            .header("origin", &origin)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{host} {origin}");
    }
    let r = app
        .http
        .post(format!("{base}/admin/jobs/{id}/retry"))
        .header("origin", &own)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(app.admin_get("/metrics").await.status, 200, "metrics stay open to scrapers");
}

/// `/metrics`: after known traffic, each counter moved by exactly that much.
async fn metrics_count_what_happened(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    app.sink.push(Behaviour::status(503));
    let first = app.post_event(&event("bot", "m-1")).await;
    app.post_event(&event("bot", "m-2")).await;
    app.post_event(&event("bot", "m-1")).await; // duplicate: 200
    let raw = serde_json::to_vec(&event("bot", "m-3")).expect("json");
    app.post_raw(raw, &[("content-type", "application/json"), ("x-webhook-signature", "00")]).await; // 401
    app.post_raw(b"{".to_vec(), &[("content-type", "text/plain")]).await; // 415
    app.wait_job(first.json["jobId"].as_str().expect("id"), "completed", WAIT).await;
    app.wait_counts(WAIT, |c| c["completed"] == 2).await;

    let r = app.http.get(format!("http://{}/metrics", app.admin)).send().await.expect("metrics");
    assert_eq!(r.status(), 200);
    // OpenMetrics text (what prometheus-client writes; Prometheus asks for it first).
    assert!(r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("application/openmetrics-text"));
    let text = r.text().await.expect("text");
    assert_eq!(text.lines().last(), Some("# EOF"), "a whole exposition");
    let value = |line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line} missing in\n{text}"))
    };
    assert_eq!(value("cogrelay_ingress_requests_total{status=\"200\"}"), 3.0);
    assert_eq!(value("cogrelay_ingress_requests_total{status=\"401\"}"), 1.0);
    assert_eq!(value("cogrelay_ingress_requests_total{status=\"415\"}"), 1.0);
    assert_eq!(value("cogrelay_ingress_ack_seconds_count"), 3.0);
    assert_eq!(value("cogrelay_deliveries_total{outcome=\"delivered\"}"), 2.0);
    assert_eq!(value("cogrelay_deliveries_total{outcome=\"retry\"}"), 1.0);
    assert_eq!(value("cogrelay_deliveries_total{outcome=\"failed\"}"), 0.0);
    assert_eq!(value("cogrelay_delivery_seconds_count"), 3.0);
    assert_eq!(value("cogrelay_queue_jobs{state=\"completed\"}"), 2.0);
    assert_eq!(value("cogrelay_queue_jobs{state=\"waiting\"}"), 0.0);
    assert_eq!(value("cogrelay_queue_oldest_waiting_seconds"), 0.0);
}
}
