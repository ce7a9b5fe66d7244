//! Real TLS servers for the pre-flight tests: a test CA made with rcgen, and
//! HTTPS servers on port 0 with valid, expired or wrong-host certificates.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

pub enum Leaf {
    Valid,
    Expired,
    /// Issued for another host name.
    WrongHost,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cogrelay test CA");
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("ca");
        let dir = tempfile::tempdir().expect("tmp");
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write ca");
        Self {
            cert,
            key,
            pem_path,
            _dir: dir,
        }
    }

    /// A leaf certificate and its key (PEM), signed by this CA.
    pub fn leaf(
        &self,
        kind: Leaf,
    ) -> (
        String,
        String,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let names = match kind {
            Leaf::WrongHost => vec!["other.example".to_string()],
            _ => vec!["localhost".to_string()],
        };
        let mut params = CertificateParams::new(names).expect("params");
        if let Leaf::Expired = kind {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        let der = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.pem(), key.serialize_pem(), der, key_der)
    }

    /// An HTTPS server on 127.0.0.1:0 answering every request 200 (text/plain).
    /// Returns `https://localhost:port/`.
    pub async fn serve(&self, kind: Leaf) -> String {
        let (_, _, der, key) = self.leaf(kind);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                        r.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("text/plain"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        format!("https://localhost:{}/", addr.port())
    }
}
