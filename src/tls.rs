//! The ingress's accept loop, plain or HTTPS (`TLS_CERT_FILE` / `TLS_KEY_FILE`:
//! Cognigy only calls endpoints with a publicly trusted certificate, and not
//! every user has a load balancer in front).
//!
//! Its own loop rather than `axum::serve`, for two reasons: TLS, and a
//! header-read timeout (`REQUEST_READ_TIMEOUT_MS`), which `axum::serve` does not
//! set, so that a client sending headers slowly (slowloris) is cut off instead
//! of holding a connection forever. The TLS handshake is bounded the same way.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest read buffer of one connection, and so the longest request
/// head (hyper's default is about 400 KiB): with thousands of connections
/// open, this is most of what each one costs.
const READ_BUFFER_BYTES: usize = 32 * 1024;

/// What to do when `accept` fails. Out of file descriptors or memory, the
/// pending connection stays in the backlog and `accept` fails again at once:
/// without a pause the loop would spin a core. Pauses from 10 ms doubling to
/// 1 s, logged once per episode; other errors (a peer that reset before
/// being accepted) are skipped at once.
#[derive(Default)]
struct AcceptBackoff {
    pause: Option<Duration>,
    failures: u64,
}

impl AcceptBackoff {
    fn failed(&mut self, e: &std::io::Error) -> Option<Duration> {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            tracing::debug!(error = %e, "accept failed");
            return None;
        }
        self.failures += 1;
        let pause = match self.pause {
            None => {
                tracing::error!(error = %e, "cannot accept connections: out of file descriptors or memory (raise `ulimit -n`); pausing accept, connections wait in the backlog");
                Duration::from_millis(10)
            }
            Some(p) => (p * 2).min(Duration::from_secs(1)),
        };
        self.pause = Some(pause);
        Some(pause)
    }

    fn accepted(&mut self) {
        if self.pause.take().is_some() {
            tracing::warn!(
                failed_accepts = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }
}

/// Reads the PEM files into a TLS acceptor; errors name the file and the fix.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the certificate chain TLS_CERT_FILE={}",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "TLS_CERT_FILE={} holds no PEM certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the private key TLS_KEY_FILE={}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not match or are not usable")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` (over TLS with `acceptor`) until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    // At stop, every open connection finishes the request it is on and closes
    // (idle keep-alive connections at once), so nothing holds the relay's
    // state after the server has stopped.
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                if let Some(pause) = backoff.failed(&e) {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                continue;
            }
        };
        backoff.accepted();
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .max_buf_size(READ_BUFFER_BYTES);
            let app = app.layer(axum::Extension(crate::ingress::ratelimit::PeerAddr(peer)));
            let service = TowerToHyperService::new(app);
            let Some(acceptor) = acceptor else {
                let _ = watcher
                    .watch(builder.serve_connection(TokioIo::new(tcp), service))
                    .await;
                return;
            };
            let tls = match tokio::time::timeout(
                read_timeout.min(HANDSHAKE_TIMEOUT),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let _ = watcher
                .watch(builder.serve_connection(TokioIo::new(tls), service))
                .await;
        });
    }
    graceful.shutdown().await;
}
