//! `rediss://`: the Redis queue over TLS, against a TLS redis-server the test
//! starts with certificates from a test CA, trusted through REDIS_CA_FILE. A
//! server whose certificate is not trusted is one line that says so.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::tls::{Leaf, TestCa};

/// redis-server with TLS only, on a free port; killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(ca: &TestCa) -> Option<TlsRedis> {
    if !crate::redis_server::available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key, _, _) = ca.leaf(Leaf::Valid);
    let (cert_path, key_path) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--tls-cert-file")
        .arg(&cert_path)
        .arg("--tls-key-file")
        .arg(&key_path)
        .arg("--tls-ca-cert-file")
        .arg(&ca.pem_path)
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let server = TlsRedis {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(server)
}

#[tokio::test]
async fn the_redis_queue_works_over_tls_and_an_untrusted_server_is_one_clear_line() {
    let ca = TestCa::new();
    let Some(redis) = start_tls_redis(&ca) else {
        return;
    };
    let url = format!("rediss://localhost:{}", redis.port);
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let relay = crate::process::start_relay(
        dir.path(),
        &sink,
        &[
            ("REDIS_URL", url.clone()),
            ("REDIS_CA_FILE", ca.pem_path.display().to_string()),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    for i in 0..20 {
        assert_eq!(
            crate::process::post(&http, relay.port, &format!("tls-{i}")).await,
            Some(200)
        );
    }
    assert!(
        sink.wait_for(20, Duration::from_secs(20)).await,
        "delivered through the TLS queue"
    );
    drop(relay);

    // Without the CA the server's certificate is not trusted: exit 1, one
    // line about the certificate, well before any timeout.
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TARGET_ENDPOINT", sink.url())
        .env("WEBHOOK_SIGNING_SECRET", SECRET)
        .env("REDIS_URL", &url)
        .env("PORT", free_port().to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(last.starts_with("error: "), "{last}");
    assert!(
        last.to_lowercase().contains("certificate"),
        "names the certificate: {last}"
    );
    assert!(!last.contains("no answer within"), "not a timeout: {last}");
    assert!(started.elapsed() < Duration::from_secs(10));
    eprintln!("untrusted TLS Redis: {last}");
}
