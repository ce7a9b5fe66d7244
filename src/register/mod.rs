//! `cogrelay register` (SPEC §4): the steps read like the spec.
//!
//! 1. authenticate, 2. validate the target, 3. register idempotently,
//! 4. verify health, 5. sync the gateway, 6. write one JSON audit line.
//!
//! Each step reports progress through the `progress` callback (stderr in the
//! binary); the result is an exit code and the audit record. A failure stops
//! the flow at its step with that step's exit code.

pub(crate) mod preflight;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cognigy::{Api, CognigyClient, CognigyConfig, CognigyError, Credentials};
use crate::secret::Secret;

pub const EXIT_OK: u8 = 0;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_TARGET: u8 = 3;
pub const EXIT_AUTH: u8 = 4;
pub const EXIT_REGISTER: u8 = 5;
pub const EXIT_HEALTH: u8 = 6;
pub const EXIT_GATEWAY: u8 = 7;
/// Cognigy could not be reached (refused, DNS, TLS, timeout) or answered
/// only 429/5xx, after the retries: nothing was said about the credentials.
pub const EXIT_UNREACHABLE: u8 = 8;

/// Retries of the gateway callback after the first attempt.
const GATEWAY_RETRIES: u32 = 3;

#[derive(Clone)]
pub struct RegisterConfig {
    pub cognigy: CognigyConfig,
    pub target: Url,
    pub signing_secret: Option<Secret>,
    pub gateway: Option<Url>,
    pub name: String,
    pub idempotency_key: String,
    pub flow_id: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub allow_http: bool,
    pub timeout: Duration,
    pub health_attempts: u32,
    pub health_delay: Duration,
}

/// Every field, the URLs' credentials and queries masked.
impl std::fmt::Debug for RegisterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterConfig")
            .field("cognigy", &self.cognigy)
            .field("target", &crate::secret::MaskedUrl(&self.target))
            .field("signing_secret", &self.signing_secret)
            .field(
                "gateway",
                &self.gateway.as_ref().map(crate::secret::MaskedUrl),
            )
            .field("name", &self.name)
            .field("idempotency_key", &self.idempotency_key)
            .field("flow_id", &self.flow_id)
            .field("ca_file", &self.ca_file)
            .field("allow_http", &self.allow_http)
            .field("timeout", &self.timeout)
            .field("health_attempts", &self.health_attempts)
            .field("health_delay", &self.health_delay)
            .finish()
    }
}

/// Deterministic, so that re-running the same registration never creates a
/// second connector: `cogrelay-` + sha256(base, target, name), 32 hex digits.
pub fn default_idempotency_key(base: &Url, target: &Url, name: &str) -> String {
    let digest = Sha256::digest(format!("{base}\n{target}\n{name}").as_bytes());
    format!("cogrelay-{}", &hex::encode(digest)[..32])
}

/// The outcome: exit code and the audit record (already complete).
#[derive(Debug, Clone)]
pub struct Registration {
    pub exit_code: u8,
    pub audit: Value,
}

struct Flow<'a> {
    cfg: &'a RegisterConfig,
    client: CognigyClient,
    progress: &'a (dyn Fn(&str) + Send + Sync),
    details: serde_json::Map<String, Value>,
}

/// Runs the whole registration. Never panics on bad answers; every failure ends
/// as an exit code with the reason in the audit record.
pub async fn run(cfg: &RegisterConfig, progress: crate::cognigy::Progress) -> Registration {
    let started = Instant::now();
    let mut details = serde_json::Map::new();
    details.insert("domain".into(), json!(cfg.cognigy.domain()));
    details.insert(
        "targetUrl".into(),
        json!(crate::secret::redact_url(&cfg.target)),
    );
    details.insert("idempotent".into(), json!(false));
    details.insert("healthVerified".into(), json!(false));
    details.insert("connectorId".into(), Value::Null);
    let result = match CognigyClient::new(cfg.cognigy.clone()) {
        Ok(client) => {
            let mut flow = Flow {
                cfg,
                client: client.with_progress(progress.clone()),
                progress: &*progress,
                details,
            };
            let r = flow.steps().await;
            details = flow.details;
            r
        }
        Err(e) => Err((EXIT_AUTH, e.to_string())),
    };
    let (exit_code, status) = match &result {
        Ok(()) => (EXIT_OK, "SUCCESS"),
        Err((code, msg)) => {
            details.insert("error".into(), json!(msg));
            (*code, "FAILURE")
        }
    };
    let audit = json!({
        "timestamp": httpdate_now(),
        "action": "WEBHOOK_REGISTRATION",
        "status": status,
        "latencyMs": started.elapsed().as_millis() as u64,
        "details": Value::Object(details),
    });
    Registration { exit_code, audit }
}

fn httpdate_now() -> String {
    crate::time::rfc3339(crate::time::now_ms())
}

type StepResult<T> = Result<T, (u8, String)>;

fn auth_or(code: u8, e: CognigyError) -> (u8, String) {
    match e {
        CognigyError::Network { .. } => (EXIT_UNREACHABLE, e.to_string()),
        CognigyError::Auth { .. } => (EXIT_AUTH, e.to_string()),
        CognigyError::Status {
            status: 401 | 403, ..
        } => (EXIT_AUTH, e.to_string()),
        other => (code, other.to_string()),
    }
}

impl Flow<'_> {
    async fn steps(&mut self) -> StepResult<()> {
        // 1. Authenticate.
        match self.client.access_token().await {
            Ok(Some(_)) => (self.progress)("ok   authenticated with OAuth client credentials"),
            Ok(None) => (self.progress)("ok   using the API key (X-API-Key)"),
            Err(e) => {
                // Refused credentials are exit 4; no answer (or only 429/5xx)
                // says nothing about them: exit 8.
                let unavailable = e.status().is_some_and(|s| s == 429 || s >= 500);
                let err = if unavailable {
                    (EXIT_UNREACHABLE, e.to_string())
                } else {
                    auth_or(EXIT_AUTH, e)
                };
                let fix = if err.0 == EXIT_AUTH {
                    "check COGNIGY_CLIENT_ID/COGNIGY_CLIENT_SECRET (or COGNIGY_API_KEY)"
                } else {
                    "check COGNIGY_BASE_URL, the network and Cognigy's status; the credentials were not checked"
                };
                (self.progress)(&format!("FAIL authentication: {}: {fix}", err.1));
                return Err(err);
            }
        }

        // 2. Validate the target.
        let validation = preflight::check(
            &self.cfg.target,
            self.cfg.ca_file.as_deref(),
            self.cfg.allow_http,
            self.cfg.timeout,
        )
        .await
        .map_err(|e| {
            (self.progress)(&format!("FAIL target validation: {e}"));
            (EXIT_TARGET, format!("target validation failed: {e}"))
        })?;
        (self.progress)(&format!(
            "ok   target answered HEAD {} in {} ms ({})",
            validation["status"],
            validation["responseTimeMs"],
            validation["contentType"]
                .as_str()
                .unwrap_or("no content type")
        ));
        self.details.insert("validation".into(), validation);

        // 3. Register.
        let (connector, idempotent) = match self.cfg.cognigy.api {
            Api::Connectors => self.register_connector().await,
            Api::Rest => self.register_rest_endpoint().await,
        }
        .inspect_err(|e| self.registration_failed(e))?;
        let id = connector_id(&connector, self.cfg.cognigy.api).ok_or_else(|| {
            (
                EXIT_REGISTER,
                "Cognigy's answer has no connector id".to_string(),
            )
        })?;
        self.details.insert("connectorId".into(), json!(id));
        self.details.insert("idempotent".into(), json!(idempotent));
        (self.progress)(&format!(
            "ok   {} {id} (idempotency key {})",
            if idempotent {
                "already registered as"
            } else {
                "registered as"
            },
            self.cfg.idempotency_key
        ));

        // 4. Verify health.
        let connector = self
            .verify_health(&id, connector)
            .await
            .inspect_err(|e| (self.progress)(&format!("FAIL health: {}", e.1)))?;
        self.details.insert("healthVerified".into(), json!(true));
        (self.progress)(&format!("ok   {id} is active"));

        // 5. Sync the gateway.
        if let Some(url) = &self.cfg.gateway {
            self.sync_gateway(url, &connector)
                .await
                .inspect_err(|e| (self.progress)(&format!("FAIL gateway sync: {}", e.1)))?;
            self.details.insert("gatewaySynced".into(), json!(true));
            (self.progress)("ok   gateway notified (connector.registered)");
        } else {
            self.details.insert("gatewaySynced".into(), json!(false));
            (self.progress)("skip gateway sync (GATEWAY_CALLBACK_URL is not set)");
        }
        Ok(())
    }

    /// The progress line of a failed registration. An API key is first used
    /// there: its refusal is labelled authentication's. A token refused
    /// there (401/403: a scope or role missing) names what to check.
    fn registration_failed(&self, e: &(u8, String)) {
        let line = match (&self.cfg.cognigy.credentials, e.0) {
            (Credentials::ApiKey(_), EXIT_AUTH) => {
                format!("FAIL authentication: {}: check COGNIGY_API_KEY", e.1)
            }
            (Credentials::OAuth { .. }, EXIT_AUTH) => format!(
                "FAIL registration: the token was refused: {}: check that the client of COGNIGY_CLIENT_ID may create endpoints (its scopes and role)",
                e.1
            ),
            _ => format!("FAIL registration: {}", e.1),
        };
        (self.progress)(&line);
    }

    fn connector_payload(&self) -> Value {
        json!({
            "name": self.cfg.name,
            "endpointUrl": self.cfg.target.as_str(),
            "authentication": { "type": "none" },
            "retryPolicy": { "maxRetries": 5, "backoffMs": 2000, "timeoutMs": 15000 },
            "headers": { "Content-Type": "application/json" },
            "requestSigning": {
                "enabled": self.cfg.signing_secret.is_some(),
                "algorithm": "HMAC-SHA256",
                "headerName": "X-Webhook-Signature",
                "secret": self.cfg.signing_secret.as_ref().map(|s| s.expose().to_string()),
            },
        })
    }

    async fn register_connector(&self) -> StepResult<(Value, bool)> {
        let url = self.client.url("/api/v1/connectors");
        let answer = self
            .client
            .send(
                Method::POST,
                url,
                &[("Idempotency-Key", &self.cfg.idempotency_key)],
                Some(&self.connector_payload()),
                "the connector registration",
            )
            .await
            .map_err(|e| auth_or(EXIT_REGISTER, e))?;
        match answer.status {
            StatusCode::CREATED | StatusCode::OK => Ok((answer.json, false)),
            StatusCode::CONFLICT => {
                let existing = answer.json.get("connector").cloned().unwrap_or(answer.json);
                Ok((existing, true))
            }
            s if matches!(s.as_u16(), 401 | 403) => Err((
                EXIT_AUTH,
                format!(
                    "Cognigy refused the registration (HTTP {s}): {}",
                    crate::cognigy::detail(&answer.json)
                ),
            )),
            s => Err((
                EXIT_REGISTER,
                format!(
                    "Cognigy answered HTTP {s} to the registration: {}",
                    crate::cognigy::detail(&answer.json)
                ),
            )),
        }
    }

    async fn register_rest_endpoint(&self) -> StepResult<(Value, bool)> {
        let mut list = self.client.url("/new/v2.0/endpoints");
        list.query_pairs_mut()
            .append_pair("filter", &self.cfg.name)
            .append_pair("limit", "100");
        let answer = self
            .client
            .send(Method::GET, list, &[], None, "the endpoint lookup")
            .await
            .map_err(|e| auth_or(EXIT_REGISTER, e))?;
        if !answer.status.is_success() {
            let code = if matches!(answer.status.as_u16(), 401 | 403) {
                EXIT_AUTH
            } else {
                EXIT_REGISTER
            };
            return Err((
                code,
                format!(
                    "Cognigy answered HTTP {} to the endpoint lookup: {}",
                    answer.status,
                    crate::cognigy::detail(&answer.json)
                ),
            ));
        }
        let existing = answer.json["items"].as_array().and_then(|items| {
            items
                .iter()
                .find(|e| e["name"].as_str() == Some(self.cfg.name.as_str()))
                .cloned()
        });
        if let Some(e) = existing {
            return Ok((e, true));
        }
        let body = json!({
            "name": self.cfg.name,
            "channel": "webhook",
            "flowId": self.cfg.flow_id,
            "settings": { "webhookUrl": self.cfg.target.as_str() },
        });
        let answer = self
            .client
            .send(
                Method::POST,
                self.client.url("/new/v2.0/endpoints"),
                &[("Idempotency-Key", &self.cfg.idempotency_key)],
                Some(&body),
                "the endpoint creation",
            )
            .await
            .map_err(|e| auth_or(EXIT_REGISTER, e))?;
        match answer.status.as_u16() {
            200 | 201 => Ok((answer.json, false)),
            401 | 403 => Err((
                EXIT_AUTH,
                format!(
                    "Cognigy refused the endpoint creation (HTTP {}): {}",
                    answer.status,
                    crate::cognigy::detail(&answer.json)
                ),
            )),
            _ => Err((
                EXIT_REGISTER,
                format!(
                    "Cognigy answered HTTP {} to the endpoint creation: {}",
                    answer.status,
                    crate::cognigy::detail(&answer.json)
                ),
            )),
        }
    }

    fn is_active(&self, c: &Value) -> bool {
        match self.cfg.cognigy.api {
            Api::Connectors => c["status"].as_str() == Some("active"),
            Api::Rest => c["active"].as_bool() == Some(true),
        }
    }

    /// Polls until active: delay, 2 × delay, 4 × delay ... between checks.
    async fn verify_health(&self, id: &str, created: Value) -> StepResult<Value> {
        if self.is_active(&created) {
            return Ok(created);
        }
        let path = match self.cfg.cognigy.api {
            Api::Connectors => "/api/v1/connectors",
            Api::Rest => "/new/v2.0/endpoints",
        };
        let mut url = self.client.url(path);
        url.path_segments_mut()
            .map_err(|_| (EXIT_HEALTH, "bad base URL".to_string()))?
            .push(id);
        let mut last = created;
        for n in 0..self.cfg.health_attempts {
            if n > 0 {
                let delay = self.cfg.health_delay * 2u32.pow((n - 1).min(16));
                (self.progress)(&format!(
                    "...  {id} is {}; checking again in {} ms",
                    state_word(&last, self.cfg.cognigy.api),
                    delay.as_millis()
                ));
                tokio::time::sleep(delay).await;
            }
            match self
                .client
                .send(Method::GET, url.clone(), &[], None, "the health check")
                .await
            {
                Ok(a) if a.status.is_success() => {
                    if self.is_active(&a.json) {
                        return Ok(a.json);
                    }
                    last = a.json;
                }
                Ok(a) => {
                    tracing::debug!(status = a.status.as_u16(), "health check answered non-2xx")
                }
                Err(e) => tracing::debug!(error = %e, "health check failed"),
            }
        }
        Err((
            EXIT_HEALTH,
            format!(
                "connector {id} is still {} after {} checks: it exists; check it in Cognigy, then run register again (it is idempotent)",
                state_word(&last, self.cfg.cognigy.api),
                self.cfg.health_attempts
            ),
        ))
    }

    async fn sync_gateway(&self, url: &Url, connector: &Value) -> StepResult<()> {
        let http = reqwest::Client::builder()
            .timeout(self.cfg.timeout)
            .build()
            .map_err(|e| (EXIT_GATEWAY, e.to_string()))?;
        let body = json!({ "event": "connector.registered", "timestamp": httpdate_now(), "connector": connector });
        let mut last_error = String::new();
        for n in 0..=GATEWAY_RETRIES {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(n - 1)).await;
            }
            match http.post(url.clone()).json(&body).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last_error = format!("HTTP {}", r.status().as_u16()),
                Err(e) => last_error = crate::cognigy::network_detail(&e),
            }
        }
        Err((
            EXIT_GATEWAY,
            format!(
                "gateway callback failed after {} attempts ({last_error}); the connector exists, notify the gateway by hand or re-run register",
                GATEWAY_RETRIES + 1
            ),
        ))
    }
}

fn connector_id(c: &Value, api: Api) -> Option<String> {
    let key = match api {
        Api::Connectors => "id",
        Api::Rest => "_id",
    };
    c.get(key).and_then(|v| {
        v.as_str()
            .map(str::to_owned)
            .or_else(|| v.as_i64().map(|n| n.to_string()))
    })
}

fn state_word(c: &Value, api: Api) -> String {
    match api {
        Api::Connectors => c["status"].as_str().unwrap_or("unknown").to_string(),
        Api::Rest => if c["active"].as_bool() == Some(true) {
            "active"
        } else {
            "inactive"
        }
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_key_is_deterministic_and_depends_on_its_inputs() {
        let base: Url = "https://acme.cognigy.com".parse().expect("url");
        let t: Url = "https://relay.example.com/api/webhook/cognigy"
            .parse()
            .expect("url");
        let k = default_idempotency_key(&base, &t, "a");
        assert_eq!(k, default_idempotency_key(&base, &t, "a"));
        assert_ne!(k, default_idempotency_key(&base, &t, "b"));
        assert!(k.starts_with("cogrelay-") && k.len() == 41);
    }
}
