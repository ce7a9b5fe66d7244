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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let builder = builder.http1_only();
            let app = app.layer(axum::Extension(crate::ingress::ratelimit::PeerAddr(peer)));
            let service = TowerToHyperService::new(app);
            let Some(acceptor) = acceptor else {
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
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
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}
