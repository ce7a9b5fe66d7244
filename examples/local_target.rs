//! A local target for trying the relay: prints every delivery it receives.
//!
//! `cargo run --example local_target -- --port 8600 [--status 503]`
//! With `--status`, it answers that status instead of 200 (to watch retries
//! and the dead-letter queue).

use clap::Parser;
use cogrelay::sink::{Behaviour, Sink};

#[derive(Parser)]
struct Args {
    /// Port to listen on (127.0.0.1).
    #[arg(long, default_value = "8600")]
    port: u16,
    /// Status to answer every delivery with.
    #[arg(long, default_value = "200")]
    status: u16,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sink = Sink::bind(([127, 0, 0, 1], args.port).into(), true).await?;
    sink.keep_bodies(false);
    sink.set_default(Behaviour::status(args.status));
    eprintln!("local target on {} answering {}", sink.url(), args.status);
    std::future::pending::<()>().await;
    Ok(())
}
