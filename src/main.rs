//! Binary: CLI -> config -> telemetry -> dispatch. Exit codes: 0 ok, 1 runtime
//! failure, 2 configuration error (one line naming the setting and the fix).

use std::process::ExitCode;

use clap::Parser;
use cogrelay::cli::{Cli, Command};
use cogrelay::config::ServeConfig;
use cogrelay::telemetry::{self, LogFormat};

fn main() -> ExitCode {
    // .env fills in what the environment does not set (flag > env > .env > default).
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let format = match LogFormat::parse(cli.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => return config_error(&e),
    };
    match cli.command {
        Command::Serve(args) => {
            let cfg = match ServeConfig::from_args(&args) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            telemetry::init(format);
            run_async(serve(cfg))
        }
    }
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ingress = tokio::net::TcpListener::bind(("0.0.0.0", cfg.port))
        .await
        .with_context(|| format!("failed to listen on port {} (PORT)", cfg.port))?;
    let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("failed to listen on {} (ADMIN_LISTEN)", cfg.admin_listen))?;
    cogrelay::serve::run(cfg, ingress, admin, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
