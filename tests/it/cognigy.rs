//! The simulator's behaviours (SPEC §6) and the Cognigy client against it:
//! token cache and refresh, refresh-once on 401, pacing under the rate limit.

use std::time::{Duration, Instant};

use base64::Engine as _;
use cogrelay::cognigy::{Api, CognigyClient, CognigyConfig, Credentials, RateLimit};
use cogrelay::secret::Secret;
use cogrelay::sim::{self, Fault, SimOptions};
use reqwest::Method;
use serde_json::{json, Value};

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

async fn token(http: &reqwest::Client, base: &str) -> String {
    let r = http
        .post(format!("{base}/api/v1/auth/token"))
        .header("authorization", basic("id", "secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&scope=connectors%3Awrite+connectors%3Aread")
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["scope"], "connectors:write connectors:read");
    v["access_token"].as_str().expect("token").to_string()
}

/// GET an events path through the client (token, rate limit and retries included).
async fn lookup(client: &CognigyClient, path: &str) -> cogrelay::cognigy::ApiAnswer {
    client
        .send(Method::GET, client.url(path), &[], None, "lookup")
        .await
        .expect("send")
}

pub fn client_config(addr: std::net::SocketAddr, api: Api) -> CognigyConfig {
    CognigyConfig {
        api,
        base: format!("http://{addr}").parse().expect("url"),
        credentials: Credentials::OAuth {
            client_id: "relay".into(),
            client_secret: Secret::new("relay-secret"),
        },
        token_url: None,
        rate_limit: RateLimit {
            max: 10_000,
            per: Duration::from_secs(60),
        },
        max_retries: 3,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn sim_token_endpoint_checks_grant_and_credentials() {
    let (addr, _sim) = sim::spawn(SimOptions {
        client_id: Some("id".into()),
        client_secret: Some(Secret::new("secret")),
        ..Default::default()
    })
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    token(&http, &base).await;
    let wrong = http
        .post(format!("{base}/api/v1/auth/token"))
        .header("authorization", basic("id", "nope"))
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);
    let v: Value = wrong.json().await.expect("json");
    assert_eq!(v["error"], "invalid_client");
    let json_body = http
        .post(format!("{base}/api/v1/auth/token"))
        .header("authorization", basic("id", "secret"))
        .json(&json!({ "grant_type": "client_credentials" }))
        .send()
        .await
        .expect("send");
    assert_eq!(
        json_body.status(),
        400,
        "a JSON body is not the form the spec requires"
    );
}

#[tokio::test]
async fn sim_connectors_are_idempotent_and_turn_active_after_polls() {
    let (addr, sim) = sim::spawn(SimOptions {
        pending_polls: 2,
        ..Default::default()
    })
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let t = token(&http, &base).await;
    let body = json!({ "name": "c1", "endpointUrl": "https://x.example/hook", "requestSigning": { "enabled": true, "secret": "shh" } });
    let post = |key: Option<&'static str>| {
        let mut r = http
            .post(format!("{base}/api/v1/connectors"))
            .bearer_auth(&t)
            .json(&body);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.send()
    };
    let first = post(Some("k1")).await.expect("post");
    assert_eq!(first.status(), 201);
    let created: Value = first.json().await.expect("json");
    assert_eq!(created["status"], "pending");
    assert!(
        created["requestSigning"].get("secret").is_none(),
        "the secret is not echoed"
    );
    let again = post(Some("k1")).await.expect("post");
    assert_eq!(again.status(), 409);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["connector"]["id"], created["id"]);
    assert_eq!(
        post(None).await.expect("post").status(),
        400,
        "Idempotency-Key is required"
    );
    assert_eq!(post(Some("k2")).await.expect("post").status(), 201);

    let id = created["id"].as_str().expect("id");
    let mut states = Vec::new();
    for _ in 0..3 {
        let c: Value = http
            .get(format!("{base}/api/v1/connectors/{id}"))
            .bearer_auth(&t)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        states.push(c["status"].as_str().expect("status").to_string());
    }
    assert_eq!(states, ["pending", "pending", "active"]);

    let page: Value = http
        .get(format!("{base}/api/v1/connectors?limit=1&offset=1"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(page["total"], 2);
    assert_eq!(page["items"].as_array().expect("items").len(), 1);
    assert_eq!(page["items"][0]["name"], "c1");
    assert_eq!(
        sim.stats()["connectors"]
            .as_array()
            .expect("connectors")
            .len(),
        2
    );
    let unauth = http
        .get(format!("{base}/api/v1/connectors"))
        .send()
        .await
        .expect("get");
    assert_eq!(unauth.status(), 401);
}

#[tokio::test]
async fn sim_events_and_rest_endpoints() {
    let (addr, _sim) = sim::spawn(SimOptions {
        pending_polls: 1,
        ..Default::default()
    })
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let t = token(&http, &base).await;
    let known = http
        .get(format!("{base}/api/v2/bots/b1/events/e1"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("get");
    assert_eq!(known.status(), 200);
    let unknown = http
        .get(format!("{base}/api/v2/bots/b1/events/unknown-7"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("get");
    assert_eq!(unknown.status(), 404);

    let created = http
        .post(format!("{base}/new/v2.0/endpoints"))
        .header("x-api-key", "any-key")
        .json(&json!({ "name": "relay", "channel": "webhook", "flowId": "f1", "settings": { "webhookUrl": "https://x/y" } }))
        .send()
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    assert_eq!(created["active"], false);
    let id = created["_id"].as_str().expect("id");
    let list: Value = http
        .get(format!("{base}/new/v2.0/endpoints?filter=relay"))
        .header("x-api-key", "k")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["total"], 1);
    let get = |_: ()| {
        http.get(format!("{base}/new/v2.0/endpoints/{id}"))
            .header("x-api-key", "k")
            .send()
    };
    let first: Value = get(()).await.expect("get").json().await.expect("json");
    let second: Value = get(()).await.expect("get").json().await.expect("json");
    assert_eq!(
        (first["active"].clone(), second["active"].clone()),
        (json!(false), json!(true))
    );
}

#[tokio::test]
async fn sim_answers_429_with_retry_after_past_the_limit() {
    let (addr, sim) = sim::spawn(SimOptions {
        rate_limit: RateLimit {
            max: 5,
            per: Duration::from_secs(60),
        },
        ..Default::default()
    })
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = http
            .get(format!("http://{addr}/api/v2/bots/b/events/e"))
            .header("x-api-key", "k")
            .send()
            .await
            .expect("get");
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[5..], [429, 429]);
    assert_eq!(sim.stats()["rateLimited"], 2);
}

#[tokio::test]
async fn one_token_serves_many_calls_and_is_refreshed_before_expiry() {
    let (addr, sim) = sim::spawn(SimOptions {
        token_ttl: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("sim");
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    for i in 0..10 {
        let a = lookup(&client, &format!("/api/v2/bots/b/events/e{i}")).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(sim.stats()["tokenRequests"], 1, "one token for ten calls");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let a = lookup(&client, "/api/v2/bots/b/events/late").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        sim.stats()["tokenRequests"],
        2,
        "refreshed before it ran out"
    );
    let statuses = sim.stats()["statuses"]["relay"].clone();
    assert!(
        !statuses.as_array().expect("statuses").contains(&json!(401)),
        "never used an expired token: {statuses}"
    );
}

#[tokio::test]
async fn a_401_on_use_refreshes_once_and_retries_once() {
    // Tokens die after 1 s although the server announces an hour.
    let (addr, sim) = sim::spawn(SimOptions {
        token_ttl: Duration::from_secs(1),
        advertised_token_ttl: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await
    .expect("sim");
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    lookup(&client, "/api/v2/bots/b/events/e").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = lookup(&client, "/api/v2/bots/b/events/e").await;
    assert_eq!(a.status, 200);
    assert_eq!(sim.stats()["tokenRequests"], 2);
    assert_eq!(
        sim.stats()["statuses"]["relay"],
        json!([200, 200, 401, 200, 200]),
        "token, call, 401, new token, retried call"
    );
}

/// A token announced for u64::MAX seconds (a server's bug) is used, and
/// refreshed after a day at most (adding it to now panicked, in `register`
/// and in each delivery that verified its event).
#[tokio::test]
async fn a_token_that_never_expires_is_used_without_a_panic() {
    let (addr, sim) = sim::spawn(SimOptions {
        advertised_token_ttl: Some(Duration::from_secs(u64::MAX)),
        ..Default::default()
    })
    .await
    .expect("sim");
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    for i in 0..3 {
        let a = lookup(&client, &format!("/api/v2/bots/b/events/e{i}")).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(sim.stats()["tokenRequests"], 1, "one token for the calls");
}

#[tokio::test]
async fn a_burst_is_paced_under_the_limit_and_never_429_twice_in_a_row() {
    let limit = RateLimit {
        max: 10,
        per: Duration::from_secs(1),
    };
    let (addr, sim) = sim::spawn(SimOptions {
        rate_limit: limit,
        ..Default::default()
    })
    .await
    .expect("sim");
    let mut cfg = client_config(addr, Api::Connectors);
    cfg.rate_limit = limit;
    let client = CognigyClient::new(cfg).expect("client");
    let t0 = Instant::now();
    for i in 0..24 {
        let a = lookup(&client, &format!("/api/v2/bots/b/events/p{i}")).await;
        assert_eq!(a.status, 200);
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "25 requests (token included) at 10/s take over 2 s"
    );
    assert_eq!(sim.stats()["rateLimited"], 0, "paced, never refused");

    // A client allowed more than the server: the server's 429 + Retry-After is honoured.
    let (addr, sim) = sim::spawn(SimOptions {
        rate_limit: RateLimit {
            max: 5,
            per: Duration::from_secs(1),
        },
        ..Default::default()
    })
    .await
    .expect("sim");
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    for i in 0..12 {
        let a = lookup(&client, &format!("/api/v2/bots/b/events/q{i}")).await;
        assert_eq!(a.status, 200);
    }
    let statuses: Vec<u64> = sim.stats()["statuses"]["relay"]
        .as_array()
        .expect("statuses")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        statuses.contains(&429),
        "the server did limit: {statuses:?}"
    );
    assert!(
        !statuses.windows(2).any(|w| w == [429, 429]),
        "never 429 twice in a row: {statuses:?}"
    );
}

#[tokio::test]
async fn injected_503_is_retried() {
    let (addr, sim) = sim::spawn(SimOptions::default()).await.expect("sim");
    sim.inject(Fault {
        path: "/api/v2/bots".into(),
        method: None,
        status: 503,
        times: 1,
        after: false,
        location: None,
    });
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    let a = lookup(&client, "/api/v2/bots/b/events/e").await;
    assert_eq!(a.status, 200);
}

/// A redirect to another host is not followed: the client would carry its
/// `X-API-Key` or bearer token there (reqwest strips only the standard
/// credential headers). A redirect within the same origin is followed.
#[tokio::test]
async fn credentials_never_follow_a_redirect_to_another_host() {
    let stranger = cogrelay::sink::Sink::start().await.expect("sink");
    for (api, credentials) in [
        (Api::Connectors, None),
        (
            Api::Rest,
            Some(Credentials::ApiKey(Secret::new("api-key-1"))),
        ),
    ] {
        let (addr, sim) = sim::spawn(SimOptions {
            api_key: Some(Secret::new("api-key-1")),
            ..Default::default()
        })
        .await
        .expect("sim");
        let mut cfg = client_config(addr, api);
        cfg.max_retries = 0;
        if let Some(c) = credentials {
            cfg.credentials = c;
        }
        let client = CognigyClient::new(cfg).expect("client");
        for status in [301, 302, 307, 308] {
            sim.inject(Fault {
                path: "/api/v2/bots".into(),
                method: None,
                status,
                times: 1,
                after: false,
                location: Some(format!("{}/stolen", stranger.url())),
            });
            let a = lookup(&client, "/api/v2/bots/b/events/e").await;
            assert_eq!(
                a.status.as_u16(),
                status,
                "{api:?}: the redirect is the answer"
            );
        }
        sim.inject(Fault {
            path: "/api/v2/bots".into(),
            method: None,
            status: 302,
            times: 1,
            after: false,
            location: Some(format!("http://{addr}/api/v2/bots/b/events/moved")),
        });
        let a = lookup(&client, "/api/v2/bots/b/events/e").await;
        assert_eq!(a.status, 200, "{api:?}: same origin is followed");
        assert_eq!(a.json["eventId"], "moved");
    }
    assert_eq!(
        stranger.received().len(),
        0,
        "no request, and so no credential, reached the other host"
    );
}

/// Ids go to exactly `/api/v2/bots/{botId}/events/{eventId}`: each one path
/// segment, whatever it holds; dot segments are refused at the ingress.
#[tokio::test]
async fn event_ids_cannot_change_the_lookup_path() {
    let (addr, sim) = sim::spawn(SimOptions::default()).await.expect("sim");
    let client = CognigyClient::new(client_config(addr, Api::Connectors)).expect("client");
    let cases = [
        ("a/b", "e?x=1#f", "/api/v2/bots/a%2Fb/events/e%3Fx%3D1%23f"),
        ("%2e%2e", ".%2E", "/api/v2/bots/%252e%252e/events/.%252E"),
        ("b", "..x", "/api/v2/bots/b/events/..x"),
        ("b\\c", "e f", "/api/v2/bots/b%5Cc/events/e%20f"),
    ];
    for (bot, event, path) in cases {
        let url = client.event_url(bot, event).expect("url");
        let a = client
            .send(Method::GET, url, &[], None, "lookup")
            .await
            .expect("send");
        assert_eq!(a.status, 200, "{bot} {event}");
        assert_eq!(a.json["botId"], bot, "the sim decodes the same id");
        assert_eq!(a.json["eventId"], event);
        let paths = sim.stats()["paths"].clone();
        assert_eq!(paths.as_array().and_then(|p| p.last()), Some(&json!(path)));
    }
    for dots in [".", ".."] {
        assert!(client.event_url(dots, "e").is_none(), "{dots}");
        assert!(client.event_url("b", dots).is_none(), "{dots}");
    }
}
