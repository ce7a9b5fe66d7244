//! The destinations file (`COGRELAY_CONFIG`, SPEC §7) into [`DestinationSet`].
//!
//! (Over 600 lines: each key's check and its one-line error stay beside the
//! file's walk, and a third is their tests, one case per bad file.)
//!
//! The file is walked by hand rather than through a derived `Deserialize`, so
//! that every error is one line naming the file, the destination and the key
//! (`cogrelay.toml: destination "crm": key timeout_ms: ...`), and a typo in a
//! key is refused instead of ignored. `${VAR}` in `url`, header values and
//! `signing_secret` is read from the environment; an unset variable is an
//! error naming it (never its value).

use std::path::Path;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use toml::{Table, Value as Toml};

use super::{parse_http_url, ConfigError};
use crate::delivery::signing::TargetSigningKey;
use crate::delivery::{DeliverySettings, Ordering, DEFAULT_ORDERING_KEY};
use crate::destination::{CircuitSettings, Destination, DestinationSet, Filter};
use crate::event::DestinationName;

/// What a destination takes where the file leaves a setting out (SPEC §7: the
/// global value named beside it).
#[derive(Debug, Clone)]
pub struct Globals {
    /// Every setting a destination may leave out (its `target` is unused).
    pub delivery: DeliverySettings,
    /// Every destination's timeout must stay below it (the lease).
    pub lock_duration: Duration,
}

const KEYS: &[&str] = &[
    "name",
    "url",
    "events",
    "bots",
    "where",
    "headers",
    "signing_secret",
    "concurrency",
    "rate_limit",
    "timeout_ms",
    "attempts",
    "backoff_ms",
    "max_age_secs",
    "circuit",
    "ordering",
    "ordering_key",
    "on_failure",
];
const CIRCUIT_KEYS: &[&str] = &["failures", "cooldown_ms", "max_cooldown_ms"];

/// Reads and checks `path`. `env` resolves `${VAR}` (the process environment
/// in the relay; a map in tests).
pub fn load(
    path: &Path,
    globals: &Globals,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DestinationSet, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "{shown}: cannot be read ({e}): check COGRELAY_CONFIG"
        ))
    })?;
    parse(&text, &shown, globals, env).map(|list| DestinationSet {
        list,
        file: Some(path.to_path_buf()),
    })
}

/// The destination names of the file a command would read
/// (`COGRELAY_CONFIG`, else `./cogrelay.toml` when it exists), read loosely:
/// the operator's commands check a name against them, nothing more. None
/// when there is no file, or it cannot be read.
pub fn names_in_file(config: Option<&str>) -> Vec<DestinationName> {
    let path = match config {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::PathBuf::from(crate::cli::defaults::CONFIG_FILE),
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(table) = text.parse::<Table>() else {
        return Vec::new();
    };
    match table.get("destination") {
        Some(Toml::Array(a)) => a
            .iter()
            .filter_map(|d| DestinationName::parse(d.get("name")?.as_str()?))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses the text of a destinations file called `file` (for the errors).
pub fn parse(
    text: &str,
    file: &str,
    globals: &Globals,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Destination>, ConfigError> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" line {l}:")).unwrap_or_default();
        ConfigError(format!(
            "{file}:{at} not valid TOML: {}",
            e.message().replace('\n', " ")
        ))
    })?;
    for key in table.keys() {
        if key != "destination" {
            return Err(ConfigError(format!(
                "{file}: unknown key {key:?}: the file holds [[destination]] tables only"
            )));
        }
    }
    let entries = match table.get("destination") {
        // `destination = []` would route every event nowhere (`unrouted`).
        Some(Toml::Array(a)) if !a.is_empty() => a,
        Some(Toml::Array(_)) | None => {
            return Err(ConfigError(format!(
                "{file}: no destination: add at least one [[destination]] with a name and a url"
            )))
        }
        Some(_) => {
            return Err(ConfigError(format!(
                "{file}: `destination` must be an array of tables: write [[destination]]"
            )))
        }
    };
    let (out, mut problems) = entries_of(entries, file, globals, env);
    match problems.is_empty() {
        true => Ok(out),
        false => Err(problems.remove(0)),
    }
}

/// Every destination of a file's text, or every problem of it: one line
/// each, each destination's first (`cogrelay config check` shows them all;
/// the relay, the first).
pub fn check(
    text: &str,
    file: &str,
    globals: &Globals,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Destination>, Vec<ConfigError>> {
    let table: Table = match text.parse() {
        Ok(t) => t,
        Err(_) => return parse(text, file, globals, env).map_err(|e| vec![e]),
    };
    match table.get("destination") {
        Some(Toml::Array(entries))
            if !entries.is_empty() && table.keys().all(|k| k == "destination") =>
        {
            let (out, problems) = entries_of(entries, file, globals, env);
            if problems.is_empty() {
                Ok(out)
            } else {
                Err(problems)
            }
        }
        _ => parse(text, file, globals, env).map_err(|e| vec![e]),
    }
}

/// The destinations of `entries`, and a problem for each one that is not.
fn entries_of(
    entries: &[Toml],
    file: &str,
    globals: &Globals,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Vec<Destination>, Vec<ConfigError>) {
    let mut out: Vec<Destination> = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Toml::Table(t) = entry else {
            problems.push(ConfigError(format!(
                "{file}: destination #{}: must be a table",
                i + 1
            )));
            continue;
        };
        match destination(t, i, file, globals, env) {
            Ok(d) if out.iter().any(|o| o.name == d.name) => problems.push(ConfigError(format!(
                "{file}: destination {:?}: key name: the name is used twice; give each destination its own",
                d.name
            ))),
            Ok(d) => out.push(d),
            Err(e) => problems.push(e),
        }
    }
    (out, problems)
}

/// One `[[destination]]` table.
struct Entry<'a> {
    t: &'a Table,
    file: &'a str,
    /// `destination "crm"` (or `destination #2` before the name is known).
    label: String,
}

impl Entry<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {}: key {key}: {msg}", self.file, self.label))
    }

    fn str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Toml::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    fn int(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ConfigError> {
        self.int_in(self.t, key, key, range)
    }

    fn int_in(
        &self,
        t: &Table,
        key: &str,
        shown: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Toml::Integer(n)) if range.contains(n) => Ok(Some(*n)),
            Some(Toml::Integer(n)) => Err(self.err(
                shown,
                format!(
                    "{n} is out of range: use {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
            Some(_) => Err(self.err(shown, "must be a whole number")),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Toml::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Toml::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(self.err(key, "must be a list of non-empty strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.err(key, "must be a list of strings, e.g. [\"a\", \"b\"]")),
        }
    }

    /// `${VAR}` replaced from the environment.
    fn expand(
        &self,
        key: &str,
        raw: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ConfigError> {
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| self.err(key, "has `${` without a closing `}`"))?;
            let var = &after[..end];
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(self.err(key, format!("${{{var}}} is not a variable name")));
            }
            let value = env(var).ok_or_else(|| {
                self.err(
                    key,
                    format!("${{{var}}} is not set in the environment: set {var}"),
                )
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn destination(
    t: &Table,
    index: usize,
    file: &str,
    g: &Globals,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Destination, ConfigError> {
    let mut e = Entry {
        t,
        file,
        label: format!("destination #{}", index + 1),
    };
    let given = e
        .str("name")?
        .ok_or_else(|| e.err("name", "is missing: give each destination a name"))?;
    let Some(name) = DestinationName::parse(given) else {
        return Err(e.err(
            "name",
            format!("{given:?} is not valid: use 1 to 32 of a-z, 0-9, - and _"),
        ));
    };
    e.label = format!("destination {:?}", name.as_str());
    if let Some(key) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(e.err(
            key,
            format!("unknown key: the keys are {}", KEYS.join(", ")),
        ));
    }
    let url_raw = e
        .str("url")?
        .ok_or_else(|| e.err("url", "is missing: give the URL events are delivered to"))?;
    let url_raw = e.expand("url", url_raw, env)?;
    let target = parse_http_url("url", &url_raw).map_err(|err| e.err("url", err.0))?;

    let filter = filter(&e, t)?;

    let headers = headers(&e, t, env)?;
    let signing_key = match e.str("signing_secret")? {
        None => None,
        Some(raw) => {
            let secret = e.expand("signing_secret", raw, env)?;
            Some(TargetSigningKey::parse(&secret).map_err(|msg| e.err("signing_secret", msg))?)
        }
    };

    // A day at most (LIMITS of config/serve.rs: the same as the globals').
    let ms = |key: &str, global: Duration| -> Result<Duration, ConfigError> {
        Ok(e.int(key, 1..=86_400_000)?
            .map_or(global, |n| Duration::from_millis(n as u64)))
    };
    let delivery_timeout = ms("timeout_ms", g.delivery.delivery_timeout)?;
    if delivery_timeout >= g.lock_duration {
        return Err(e.err(
            "timeout_ms",
            format!(
                "{} must be less than LOCK_DURATION_MS={}: lower it or raise LOCK_DURATION_MS",
                delivery_timeout.as_millis(),
                g.lock_duration.as_millis()
            ),
        ));
    }
    let mut backoff = g.delivery.backoff;
    backoff.base = ms("backoff_ms", backoff.base)?;
    let circuit = circuit_settings(&e, t, g.delivery.circuit)?;
    let delivery = DeliverySettings {
        target,
        delivery_timeout,
        attempts: e
            .int("attempts", 1..=100)?
            .map_or(g.delivery.attempts, |n| n as u32),
        backoff,
        signing_key: signing_key.or_else(|| g.delivery.signing_key.clone()),
        concurrency: e
            .int("concurrency", 1..=4096)?
            .map_or(g.delivery.concurrency, |n| n as usize),
        headers,
        // The most a Redis queue's shared limit holds within 5% (one
        // maximum for both queues: a file moves between them).
        rate_limit: e
            .int(
                "rate_limit",
                0..=i64::from(crate::queue::redis::MAX_RATE_LIMIT),
            )?
            .map_or(g.delivery.rate_limit, |n| n as u32),
        max_age: e
            .int("max_age_secs", 1..=31_536_000)?
            .map_or(g.delivery.max_age, |n| Duration::from_secs(n as u64)),
        circuit,
        ordering: ordering(&e)?,
    };
    Ok(Destination {
        name,
        filter,
        delivery,
    })
}

/// `ordering`, `ordering_key` and `on_failure` (SPEC §7).
fn ordering(e: &Entry<'_>) -> Result<Option<Ordering>, ConfigError> {
    let ordered = match e.str("ordering")? {
        None | Some("none") => false,
        Some("session") => true,
        Some(other) => {
            return Err(e.err(
                "ordering",
                format!("{other:?} is not an ordering: use \"session\" (one key's events one at a time, in order), or leave it out"),
            ))
        }
    };
    let key = e.str("ordering_key")?;
    let on_failure = e.str("on_failure")?;
    if !ordered {
        if let Some(k) = [("ordering_key", key), ("on_failure", on_failure)]
            .into_iter()
            .find_map(|(k, v)| v.map(|_| k))
        {
            return Err(e.err(k, "is set but ordering is not \"session\": add ordering = \"session\", or leave it out"));
        }
        return Ok(None);
    }
    let key = key.unwrap_or(DEFAULT_ORDERING_KEY);
    if !key.starts_with('/') {
        return Err(e.err(
            "ordering_key",
            format!("{key:?} is not a JSON pointer: start it with /, e.g. \"/payload/sessionId\""),
        ));
    }
    let hold = match on_failure {
        None | Some("continue") => false,
        Some("hold") => true,
        Some(other) => {
            return Err(e.err(
                "on_failure",
                format!("{other:?} is not a choice: use \"continue\" (the key goes on) or \"hold\" (it waits for an operator)"),
            ))
        }
    };
    Ok(Some(Ordering::new(key, hold)))
}

/// `events`, `bots` and `where`: which events a destination wants.
fn filter(e: &Entry<'_>, t: &Table) -> Result<Filter, ConfigError> {
    let events = e.strings("events")?.unwrap_or_else(|| vec!["*".into()]);
    if events.is_empty() {
        return Err(e.err(
            "events",
            "is empty: leave it out for every event, or list globs",
        ));
    }
    let bots = e.strings("bots")?;
    if bots.as_ref().is_some_and(Vec::is_empty) {
        return Err(e.err("bots", "is empty: leave it out for every bot"));
    }
    let conditions = match t.get("where") {
        None => Vec::new(),
        Some(Toml::Table(w)) => w
            .iter()
            .map(|(pointer, v)| {
                let shown = format!("where.{pointer:?}");
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    return Err(e.err(
                        &shown,
                        "is not a JSON pointer: start it with /, e.g. \"/payload/channel\"",
                    ));
                }
                let value = serde_json::to_value(v)
                    .map_err(|err| e.err(&shown, format!("cannot be compared ({err})")))?;
                Ok((pointer.clone(), value))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(e.err(
            "where",
            "must be a table of JSON pointer = value, e.g. { \"/payload/channel\" = \"voice\" }",
        )),
    };
    Filter::new(events, bots, conditions).map_err(|err| e.err("events", err))
}

/// `headers`: sent with every delivery (`${VAR}` expanded; values hidden
/// from debug output).
fn headers(
    e: &Entry<'_>,
    t: &Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, ConfigError> {
    let mut headers = HeaderMap::new();
    match t.get("headers") {
        None => {}
        Some(Toml::Table(h)) => {
            for (k, v) in h {
                let shown = format!("headers.{k}");
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| e.err(&shown, "is not a valid header name"))?;
                let Toml::String(raw) = v else {
                    return Err(e.err(&shown, "must be a string"));
                };
                let mut value = HeaderValue::from_str(&e.expand(&shown, raw, env)?)
                    .map_err(|_| e.err(&shown, "is not a valid header value"))?;
                // Values may be credentials: Debug shows them as `Sensitive`.
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }
        Some(_) => return Err(e.err("headers", "must be a table of name = value")),
    }
    Ok(headers)
}

/// `[destination.circuit]`, over the global circuit settings.
fn circuit_settings(
    e: &Entry<'_>,
    t: &Table,
    global: CircuitSettings,
) -> Result<CircuitSettings, ConfigError> {
    let g = global;
    Ok(match t.get("circuit") {
        None => g,
        Some(Toml::Table(c)) => {
            if let Some(key) = c.keys().find(|k| !CIRCUIT_KEYS.contains(&k.as_str())) {
                return Err(e.err(
                    &format!("circuit.{key}"),
                    format!("unknown key: the keys are {}", CIRCUIT_KEYS.join(", ")),
                ));
            }
            let cms = |key: &str, global: Duration| -> Result<Duration, ConfigError> {
                Ok(e.int_in(c, key, &format!("circuit.{key}"), 1..=86_400_000)?
                    .map_or(global, |n| Duration::from_millis(n as u64)))
            };
            let settings = CircuitSettings {
                failures: e
                    .int_in(c, "failures", "circuit.failures", 0..=1000)?
                    .map_or(g.failures, |n| n as u32),
                cooldown: cms("cooldown_ms", g.cooldown)?,
                max_cooldown: cms("max_cooldown_ms", g.max_cooldown)?,
            };
            if settings.max_cooldown < settings.cooldown {
                return Err(e.err(
                    "circuit.max_cooldown_ms",
                    "is less than cooldown_ms: make it at least as long",
                ));
            }
            settings
        }
        Some(_) => return Err(e.err("circuit", "must be a table: write [destination.circuit]")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::backoff::Backoff;

    fn globals() -> Globals {
        Globals {
            delivery: DeliverySettings {
                target: reqwest::Url::parse("http://unused.invalid/").expect("url"),
                delivery_timeout: Duration::from_secs(15),
                attempts: 5,
                backoff: Backoff {
                    base: Duration::from_secs(2),
                    jitter: 0.0,
                    max_retry_after: Duration::from_secs(3600),
                },
                signing_key: None,
                concurrency: 16,
                headers: HeaderMap::new(),
                rate_limit: 0,
                max_age: Duration::from_secs(86_400),
                circuit: CircuitSettings {
                    failures: 5,
                    cooldown: Duration::from_secs(10),
                    max_cooldown: Duration::from_secs(300),
                },
                ordering: None,
            },
            lock_duration: Duration::from_secs(30),
        }
    }

    fn env(var: &str) -> Option<String> {
        match var {
            "CRM_API_KEY" => Some("crm-key-123".into()),
            "CRM_WHSEC" => Some("whsec_c2VjcmV0LXNpZ25pbmcta2V5".into()),
            _ => None,
        }
    }

    fn load_text(text: &str) -> Result<Vec<Destination>, ConfigError> {
        parse(text, "cogrelay.toml", &globals(), &env)
    }

    const EXAMPLE: &str = r#"
[[destination]]
name = "crm"
url = "https://crm.internal/cognigy"
events = ["conversation.*"]
bots = ["bot-sales"]
where = { "/payload/channel" = "voice" }
headers = { "X-Api-Key" = "${CRM_API_KEY}" }
signing_secret = "${CRM_WHSEC}"
concurrency = 8
rate_limit = 50
timeout_ms = 5000
attempts = 8
backoff_ms = 1000
max_age_secs = 3600

[destination.circuit]
failures = 3
cooldown_ms = 2000
max_cooldown_ms = 60000

[[destination]]
name = "warehouse"
url = "http://warehouse.internal:8080/events"

[[destination]]
name = "ticketing"
url = "https://tickets.internal/hooks/cognigy"
events = ["handover.*", "cognigy.output"]
"#;

    #[test]
    fn the_worked_example_resolves_with_the_globals_where_left_out() {
        let list = load_text(EXAMPLE).expect("valid");
        let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["crm", "warehouse", "ticketing"]);
        let crm = &list[0];
        assert_eq!(crm.delivery.concurrency, 8);
        assert_eq!(crm.delivery.attempts, 8);
        assert_eq!(crm.delivery.delivery_timeout, Duration::from_secs(5));
        assert_eq!(crm.delivery.backoff.base, Duration::from_secs(1));
        assert_eq!(crm.delivery.rate_limit, 50);
        assert_eq!(crm.delivery.max_age, Duration::from_secs(3600));
        assert_eq!(crm.delivery.circuit.failures, 3);
        assert_eq!(crm.delivery.circuit.cooldown, Duration::from_secs(2));
        assert_eq!(crm.delivery.headers["x-api-key"], "crm-key-123");
        assert!(crm.delivery.headers["x-api-key"].is_sensitive());
        assert!(crm.delivery.signing_key.is_some());
        let doc = br#"{"payload": {"channel": "voice"}}"#;
        assert!(crm
            .filter
            .wants("conversation.started", Some("bot-sales"), doc));
        assert!(!crm
            .filter
            .wants("handover.requested", Some("bot-sales"), doc));

        let wh = &list[1];
        assert_eq!(wh.delivery.concurrency, 16, "CONCURRENCY");
        assert_eq!(wh.delivery.attempts, 5, "ATTEMPTS");
        assert_eq!(wh.delivery.delivery_timeout, Duration::from_secs(15));
        assert_eq!(wh.delivery.rate_limit, 0, "no limit");
        assert_eq!(wh.delivery.circuit, globals().delivery.circuit);
        assert_eq!(wh.delivery.max_age, Duration::from_secs(86_400));
        assert!(wh.filter.wants("anything.at.all", None, b""));
        assert!(list[2]
            .filter
            .wants(crate::destination::OUTPUT_TYPE, None, b""));
    }

    #[test]
    fn the_resolved_view_hides_every_credential() {
        let dests = DestinationSet {
            list: load_text(EXAMPLE).expect("valid"),
            file: Some("cogrelay.toml".into()),
        };
        let shown = serde_json::to_string(&dests.resolved()).expect("json");
        for secret in ["crm-key-123", "c2VjcmV0LXNpZ25pbmcta2V5"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains(r#""X-Api-Key":"***""#) || shown.contains(r#""x-api-key":"***""#),
            "{shown}"
        );
        assert!(shown.contains(r#""signing_secret":"***""#), "{shown}");
        let debug = format!("{dests:?}");
        assert!(!debug.contains("crm-key-123"), "Debug hides header values");
    }

    #[test]
    fn each_bad_file_is_one_line_naming_the_file_the_destination_and_the_key() {
        let ok = "[[destination]]\nname = \"crm\"\nurl = \"http://x/\"\n";
        let with = |extra: &str| format!("{ok}{extra}\n");
        let cases: Vec<(String, &str)> = vec![
            ("name = ".into(), "not valid TOML"),
            ("name = \"crm\"".into(), "unknown key \"name\""),
            (
                "[[destination]]\nurl = \"http://x/\"".into(),
                "destination #1: key name: is missing",
            ),
            (
                "[[destination]]\nname = \"CRM\"\nurl = \"http://x/\"".into(),
                "destination #1: key name: \"CRM\" is not valid",
            ),
            (
                "[[destination]]\nname = \"crm\"".into(),
                "destination \"crm\": key url: is missing",
            ),
            (
                with("urll = \"x\""),
                "destination \"crm\": key urll: unknown key",
            ),
            (
                format!("{ok}{ok}"),
                "destination \"crm\": key name: the name is used twice",
            ),
            (
                with("timeout_ms = 30000"),
                "key timeout_ms: 30000 must be less than LOCK_DURATION_MS=30000",
            ),
            (with("attempts = 0"), "key attempts: 0 is out of range"),
            (
                with("attempts = \"5\""),
                "key attempts: must be a whole number",
            ),
            (
                with("events = [\"conv[\"]"),
                "key events: \"conv[\" is not a valid glob",
            ),
            (with("events = []"), "key events: is empty"),
            (
                with("where = { \"payload\" = 1 }"),
                "key where.\"payload\": is not a JSON pointer",
            ),
            (
                with("headers = { \"X-Key\" = \"${NOT_SET}\" }"),
                "key headers.X-Key: ${NOT_SET} is not set in the environment",
            ),
            (
                with("headers = { \"Bad Name\" = \"v\" }"),
                "key headers.Bad Name: is not a valid header name",
            ),
            (with("signing_secret = \"whsec_!!\""), "key signing_secret:"),
            (
                with("[destination.circuit]\nfailure = 3"),
                "key circuit.failure: unknown key",
            ),
            (
                with("[destination.circuit]\ncooldown_ms = 9000\nmax_cooldown_ms = 10"),
                "key circuit.max_cooldown_ms",
            ),
            (
                "[[target]]\nname = \"crm\"".into(),
                "unknown key \"target\"",
            ),
            ("".into(), "no destination"),
            (
                ok.replace("http://x/", "ftp://x/"),
                "key url: url=\"ftp://x/\" is not an http(s) URL",
            ),
        ];
        for (text, expected) in &cases {
            let err = load_text(text).expect_err(expected).to_string();
            assert!(err.starts_with("cogrelay.toml:"), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn a_toml_error_names_its_line() {
        let err = load_text("[[destination]]\nname = \"crm\"\nurl = http://x/\n")
            .expect_err("bad")
            .to_string();
        assert!(err.starts_with("cogrelay.toml: line 3:"), "{err}");
    }

    #[test]
    fn an_unset_variable_is_named_and_a_set_one_never_shown() {
        let text = "[[destination]]\nname = \"crm\"\nurl = \"https://${CRM_API_KEY}@crm/\"\nsigning_secret = \"${NOPE}\"\n";
        let err = load_text(text).expect_err("unset").to_string();
        assert!(err.contains("${NOPE} is not set"), "{err}");
        assert!(!err.contains("crm-key-123"), "{err}");
    }
}
