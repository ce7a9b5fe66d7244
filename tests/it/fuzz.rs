//! Property-based fuzzing of the parsers that see untrusted input: envelope
//! parsing, signature verification, Retry-After, configuration. Each must
//! return an answer (never panic) for any input, and keep its invariants.
//!
//! Runs with the suite (256 cases each). For a long run:
//! `PROPTEST_CASES=200000 cargo test --release --test it fuzz::`

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderValue};
use clap::Parser;
use cogrelay::config::ServeConfig;
use cogrelay::delivery::classify::parse_retry_after;
use cogrelay::ingress::auth::{sign_hex, Authenticator, SIGNATURE_HEADER};
use cogrelay::ingress::envelope::{self, EnvelopeError};
use cogrelay::secret::Secret;
use proptest::prelude::*;

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    // Mostly JSON-ish text with the envelope's field names, some raw bytes.
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"botId\"".to_string()),
        Just("\"eventId\"".to_string()),
        Just("\"type\"".to_string()),
        Just("\"payload\"".to_string()),
        Just("\"sessionId\"".to_string()),
        Just("\"userId\"".to_string()),
        Just("\"AIOutput\"".to_string()),
        Just("\"traceId\"".to_string()),
        Just("null".to_string()),
        Just("1e999".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        "\"[ -~]{0,12}\"".prop_map(|s| s),
        "-?[0-9]{1,5}".prop_map(|s| s),
    ];
    prop_oneof![
        3 => proptest::collection::vec(token, 0..40).prop_map(|t| t.concat().into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #[test]
    fn envelope_parsing_never_panics_and_keys_are_header_safe(body in json_like()) {
        match envelope::parse(&body) {
            Ok(ev) => {
                let key = ev.key.as_str();
                prop_assert!(key.starts_with("cognigy-"));
                prop_assert!(key.bytes().all(|b| (0x20..0x7f).contains(&b)), "key must fit a header: {key:?}");
                prop_assert!(HeaderValue::from_str(&ev.event_id).is_ok());
            }
            Err(EnvelopeError::Missing(m)) => prop_assert!(!m.is_empty()),
            Err(_) => {}
        }
    }

    #[test]
    fn any_valid_envelope_round_trips(bot in "[a-zA-Z0-9_.-]{1,40}", id in "[ -~]{1,60}", kind in "[a-z.]{1,20}", n in any::<i64>()) {
        prop_assume!(![".", ".."].contains(&bot.as_str()) && ![".", ".."].contains(&id.as_str()), "dot segments are refused");
        prop_assume!(!id.starts_with(' ') && !id.ends_with(' '), "an eventId with a space at either end is refused");
        let body = serde_json::json!({ "botId": bot, "eventId": id, "type": kind, "payload": { "n": n } });
        let ev = envelope::parse(&serde_json::to_vec(&body).expect("json")).expect("valid envelope");
        prop_assert_eq!(ev.key.as_str(), format!("cognigy-{bot}-{id}"));
        let payload: serde_json::Value = serde_json::from_slice(&ev.body).expect("payload json");
        prop_assert_eq!(payload["n"].as_i64(), Some(n));
    }

    #[test]
    fn signature_check_never_panics_on_any_header(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        header in proptest::collection::vec(any::<u8>(), 0..140),
    ) {
        let auth = Authenticator::new(&[Secret::new("fuzz-secret")], None);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&header) {
            h.insert(SIGNATURE_HEADER, v);
            let right = sign_hex("fuzz-secret", &body);
            let ok = auth.check(&h, &body).is_ok();
            let stripped = header.strip_prefix(b"sha256=").unwrap_or(&header).trim_ascii().to_ascii_lowercase();
            prop_assert_eq!(ok, stripped == right.as_bytes());
        }
    }

    /// The near misses an attacker would try, each against an oracle that
    /// does not share the implementation: only the right digest, in either
    /// case of hex, with or without `sha256=`, by a secret of the list, passes.
    #[test]
    fn near_miss_signatures_are_refused(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        mutation in 0usize..10,
        at in 0usize..64,
        junk in "[0-9a-fA-F=:, ]{1,4}",
    ) {
        let auth = Authenticator::new(&[Secret::new("old-secret"), Secret::new("fuzz-secret")], None);
        let right = sign_hex("fuzz-secret", &body);
        let flip = |c: char| if c == '0' { '1' } else { '0' };
        let (candidate, valid) = match mutation {
            0 => (right.clone(), true),
            1 => (right.to_uppercase(), true),
            2 => (format!("sha256={right}"), true),
            3 => (sign_hex("old-secret", &body), true),
            4 => (right[..at].to_string(), false),
            5 => (format!("{junk}{right}"), junk.trim().is_empty()),
            6 => (format!("{right}{junk}"), junk.trim().is_empty()),
            7 => (sign_hex("other-secret", &body), false),
            8 => (right.chars().enumerate().map(|(i, c)| if i == at { flip(c) } else { c }).collect(), false),
            _ => (format!("SHA256={right}"), false),
        };
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(&candidate).expect("ascii"));
        prop_assert_eq!(auth.check(&h, &body).is_ok(), valid, "mutation {} {:?}", mutation, candidate);
    }

    #[test]
    fn retry_after_parsing_never_panics(value in "\\PC{0,40}", secs in any::<u64>()) {
        let now = SystemTime::now();
        let _ = parse_retry_after(&value, now);
        prop_assert_eq!(parse_retry_after(&secs.to_string(), now), Some(Duration::from_secs(secs)));
    }

    /// One setting at a time on a valid base: whatever the value, the
    /// configuration is valid, or its one-line error names that setting.
    #[test]
    fn a_bad_setting_is_named_in_its_error(
        which in 0usize..15,
        value in prop_oneof![
            "\\PC{0,24}",
            "-?[0-9]{1,22}",
            Just("0".to_string()),
            Just("".to_string()),
            "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}:[0-9]{1,6}",
            "(https?|redis|rediss|ftp)://[a-z@:.]{0,12}(:[0-9]{1,6})?(/[a-z]{0,5})?",
        ],
    ) {
        const SETTINGS: [(&str, &str); 15] = [
            ("--port", "PORT"),
            ("--concurrency", "CONCURRENCY"),
            ("--attempts", "ATTEMPTS"),
            ("--backoff-delay-ms", "BACKOFF_DELAY_MS"),
            ("--backoff-jitter", "BACKOFF_JITTER"),
            ("--max-retry-after-secs", "MAX_RETRY_AFTER_SECS"),
            ("--delivery-timeout-ms", "DELIVERY_TIMEOUT_MS"),
            ("--lock-duration-ms", "LOCK_DURATION_MS"),
            ("--admin-listen", "ADMIN_LISTEN"),
            ("--target-endpoint", "TARGET_ENDPOINT"),
            ("--queue", "COGRELAY_QUEUE"),
            ("--redis-url", "REDIS_URL"),
            ("--dedup-ttl-secs", "DEDUP_TTL_SECS"),
            ("--max-body-bytes", "MAX_BODY_BYTES"),
            ("--webhook-signing-secret", "WEBHOOK_SIGNING_SECRET"),
        ];
        let base = [
            ("--target-endpoint", "http://127.0.0.1:9/events"),
            ("--webhook-signing-secret", "s3cret"),
        ];
        let (flag, name) = SETTINGS[which];
        let mut argv = vec!["cogrelay".to_string(), "serve".to_string()];
        for (f, v) in base.iter().filter(|(f, _)| *f != flag) {
            argv.push(format!("{f}={v}"));
        }
        argv.push(format!("{flag}={value}"));
        let cli = cogrelay::cli::Cli::try_parse_from(&argv);
        prop_assume!(cli.is_ok(), "clap itself refused it");
        let Ok(cogrelay::cli::Cli { command: cogrelay::cli::Command::Serve(a), .. }) = cli else {
            unreachable!()
        };
        if let Err(e) = ServeConfig::from_args(&a) {
            let e = e.to_string();
            prop_assert!(!e.contains('\n'), "one line: {}", e);
            prop_assert!(e.contains(name), "{}={:?}: the error names the setting: {}", name, value, e);
        }
    }
}
