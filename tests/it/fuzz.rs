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
        let body = serde_json::json!({ "botId": bot, "eventId": id, "type": kind, "payload": { "n": n } });
        let ev = envelope::parse(&serde_json::to_vec(&body).expect("json")).expect("valid envelope");
        prop_assert_eq!(ev.key.as_str(), format!("cognigy-{bot}-{id}"));
        let payload: serde_json::Value = serde_json::from_slice(&ev.body).expect("payload json");
        prop_assert_eq!(payload["n"].as_i64(), Some(n));
    }

    #[test]
    fn signature_check_never_panics_and_accepts_only_the_right_one(
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
        let mut good = HeaderMap::new();
        good.insert(SIGNATURE_HEADER, HeaderValue::from_str(&sign_hex("fuzz-secret", &body)).expect("hex"));
        prop_assert!(auth.check(&good, &body).is_ok());
    }

    #[test]
    fn retry_after_parsing_never_panics(value in "\\PC{0,40}", secs in any::<u64>()) {
        let now = SystemTime::now();
        let _ = parse_retry_after(&value, now);
        prop_assert_eq!(parse_retry_after(&secs.to_string(), now), Some(Duration::from_secs(secs)));
    }

    #[test]
    fn config_parsing_never_panics(values in proptest::collection::vec("\\PC{0,24}", 12)) {
        let flags = [
            "--port", "--concurrency", "--attempts", "--backoff-delay-ms", "--backoff-jitter", "--max-retry-after-secs",
            "--delivery-timeout-ms", "--lock-duration-ms", "--admin-listen", "--target-endpoint", "--queue", "--redis-url",
        ];
        let mut argv = vec!["cogrelay".to_string(), "serve".to_string()];
        for (f, v) in flags.iter().zip(&values) {
            argv.push(format!("{f}={v}"));
        }
        if let Ok(cli) = cogrelay::cli::Cli::try_parse_from(&argv) {
            if let cogrelay::cli::Command::Serve(a) = cli.command {
                if let Err(e) = ServeConfig::from_args(&a) {
                    prop_assert!(!e.to_string().contains('\n'), "one line: {e}");
                }
            }
        }
    }
}
