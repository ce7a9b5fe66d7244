//! Binary: CLI -> config -> telemetry -> dispatch. Exit codes: 0 ok, 1 runtime
//! failure, 2 configuration error (one line naming the setting and the fix).

use std::process::ExitCode;

use clap::Parser;
use cogrelay::cli::{Cli, Command, RegisterArgs};
use cogrelay::config::ServeConfig;
use cogrelay::telemetry::{self, LogFormat};

/// A line on stderr. One that cannot be written (stderr closed, as in
/// `cogrelay register 2>&1 | head -1`) is dropped: `eprintln!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// mimalloc: the relay allocates a little per request and per delivery on
/// several threads, and glibc's malloc cost about 13% of its CPU under load.
/// Built without transparent huge pages, which inflated RSS by about 60%.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // .env fills in what the environment does not set (flag > env > .env > default).
    if let Err(e) = load_dotenv() {
        // `--help` and `--version` still answer (with the problem said).
        let asks_help = std::env::args()
            .skip(1)
            .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version" | "help"));
        if !asks_help {
            return config_error(&e);
        }
        say!("warning: {e}");
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version or a usage error: clap's text, and its exit
        // code; help that cannot be written (a full disk) is exit 1.
        Err(e) => {
            return match e.print() {
                Err(io) if io.kind() != std::io::ErrorKind::BrokenPipe && e.exit_code() == 0 => {
                    say!("error: cannot write the output: {io}");
                    ExitCode::from(1)
                }
                _ => ExitCode::from(e.exit_code().clamp(0, 255) as u8),
            };
        }
    };
    let format = match cogrelay::config::log_format(cli.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => return config_error(&e),
    };
    match cli.command {
        Command::Serve(args) => {
            let cfg = match ServeConfig::from_args(&args) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let mut cfg = cfg;
            if format == LogFormat::Pretty {
                cfg.summary_every = Some(std::time::Duration::from_secs(5));
            }
            telemetry::init(format);
            run_async(serve(cfg))
        }
        Command::Register(args) => register(args, format),
        Command::Jobs(args) => jobs(
            &args.store,
            cogrelay::jobs_cli::Op::Jobs(args.command),
            args.json,
        ),
        Command::Queue(args) => jobs(&args.store, args.command.into(), args.json),
        Command::Destinations(args) => jobs(
            &args.store,
            cogrelay::jobs_cli::Op::Destinations(
                args.command
                    .unwrap_or(cogrelay::cli::DestinationsCommand::List),
            ),
            args.json,
        ),
        Command::Config(args) => match args.command {
            cogrelay::cli::ConfigCommand::Check(serve_args) => config_check(&serve_args),
        },
        Command::Sim(args) => {
            let opts = match cogrelay::config::sim_options(&args) {
                Ok(o) => o,
                Err(e) => return config_error(&e),
            };
            telemetry::init(format);
            let port = args.port.trim().parse::<u16>().unwrap_or(8600);
            run_async(sim(port, opts))
        }
    }
}

/// `cogrelay config check`: every setting of `serve` checked, every problem
/// of the destinations file one line each, the resolved destinations
/// printed (credentials ***). No ingress secret needed (a note says so).
fn config_check(args: &cogrelay::cli::ServeArgs) -> ExitCode {
    let (checked, notes) = ServeConfig::check(args);
    for note in &notes {
        say!("{note}");
    }
    let cfg = match checked {
        Ok(c) => c,
        Err(problems) => {
            for p in &problems {
                say!("error: {p}");
            }
            return ExitCode::from(2);
        }
    };
    let resolved = cfg.destinations().resolved();
    match serde_json::to_string_pretty(&resolved) {
        Ok(text) if print_line(&text) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn register(args: Box<RegisterArgs>, format: LogFormat) -> ExitCode {
    use cogrelay::register;
    let cfg = match cogrelay::config::register_config(&args) {
        Ok(c) => c,
        Err(e) => {
            say!("error: {e}");
            let audit = serde_json::json!({
                "timestamp": cogrelay::time::rfc3339(cogrelay::time::now_ms()), "action": "WEBHOOK_REGISTRATION", "status": "FAILURE", "latencyMs": 0,
                "details": { "error": e.to_string() },
            });
            print_line(&audit.to_string());
            return ExitCode::from(register::EXIT_CONFIG);
        }
    };
    // Logs only on request (RUST_LOG); the human summary is the progress lines.
    if std::env::var_os("RUST_LOG").is_some() {
        telemetry::init(format);
    }
    let quiet = args.json;
    let progress: cogrelay::cognigy::Progress = std::sync::Arc::new(move |line: &str| {
        if !quiet {
            say!("{line}");
        }
    });
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::from(1);
    };
    let outcome = rt.block_on(register::run(&cfg, progress));
    let written = print_line(&outcome.audit.to_string());
    if outcome.exit_code != 0 {
        if let Some(err) = outcome.audit["details"]["error"].as_str() {
            say!("error: {err}");
        }
    }
    // Registered, but its audit line lost: not a success a script can trust.
    if outcome.exit_code == 0 && !written {
        return ExitCode::from(1);
    }
    ExitCode::from(outcome.exit_code)
}

fn jobs(store: &cogrelay::cli::StoreArgs, op: cogrelay::jobs_cli::Op, json: bool) -> ExitCode {
    let store = match cogrelay::config::store_settings(store) {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::from(1);
    };
    let configured = cogrelay::config::destinations::names_in_file(
        std::env::var("COGRELAY_CONFIG").ok().as_deref(),
    );
    match rt.block_on(cogrelay::jobs_cli::run(&store, op, json, &configured)) {
        Ok(out) if print_line(&out) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A line on stdout; whether it could be written. A reader that went away
/// (`cogrelay jobs list | head`) ends the output quietly, as written: the
/// process exits as it would have. Any other failure (a full disk) is said,
/// and the command exits 1.
fn print_line(text: &str) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            say!("error: cannot write the output: {e}");
            false
        }
    }
}

async fn sim(port: u16, opts: cogrelay::sim::SimOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("failed to listen on 127.0.0.1:{port} (--port)"))?;
    let sim = cogrelay::sim::Sim::new(opts);
    // The port bound (`--port 0` takes a free one).
    let port = listener.local_addr().map_or(port, |a| a.port());
    tracing::info!("Cognigy simulator on http://127.0.0.1:{port} (stats: GET /sim/stats; target sink: POST /events; gateway: POST /gateway)");
    tokio::select! {
        r = cogrelay::sim::serve(listener, sim) => r.context("simulator stopped")?,
        _ = shutdown_signal() => {}
    }
    Ok(())
}

/// Builds a runtime, or says why it could not (the caller exits 1).
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .on_thread_park(give_memory_back)
        .build()
        .map_err(|e| say!("error: failed to start the async runtime: {e}"))
        .ok()
}

/// mimalloc hands memory that a thread freed back to the OS only when that
/// thread allocates again, so after a burst (a flood of large bodies, a
/// backlog drained) idle threads would keep it. When a runtime thread goes
/// idle, at most once a second, and only while the process holds more than
/// [`COLLECT_ABOVE_RSS`] (a relay at work holds about 25 MB), it asks
/// mimalloc to collect its heap. (Collecting regardless cost the relay CPU
/// under load: the pages given back are soon faulted in again.)
fn give_memory_back() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last.get().is_none_or(|t| now - t >= Duration::from_secs(1));
        if due {
            last.set(Some(now));
        }
        due
    });
    if due && resident_bytes().is_some_and(|rss| rss > COLLECT_ABOVE_RSS) {
        collect_heap();
    }
}

/// Resident set size past which idle threads give memory back.
const COLLECT_ABOVE_RSS: u64 = 64 * 1024 * 1024;

/// The process's resident set (`VmRSS` of /proc/self/status), where there is one.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// The binary's one `unsafe` besides the thread priority in `serve`.
#[allow(unsafe_code)]
fn collect_heap() {
    // SAFETY: mi_collect takes a flag and touches only the calling thread's
    // mimalloc heap, which is the global allocator of this binary.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Loads the first `.env` in the working directory or a parent (as dotenvy
/// finds it: the nearest that is a file; a path it cannot inspect ends the
/// search). A line that is not `NAME=value` is an error naming the file and
/// the line's number, never its text (it may hold a secret).
fn load_dotenv() -> Result<(), String> {
    let Ok(cwd) = std::env::current_dir() else {
        return Ok(());
    };
    let Ok(path) = find_dotenv(&cwd) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    // As dotenvy looks: a value that is not UTF-8 is overridden.
    let in_env = |name: &str| std::env::var(name).is_ok();
    if let Some((line, name)) = cogrelay::config::dotenv::dropped_dollar(&text, &in_env) {
        // The line's number and name, never its value (it may be a secret).
        return Err(format!(
            "{}: line {line}: a `$` in {name}'s value names no variable that is set, \
             so it would be read as nothing: write the value in single quotes ('...'), \
             or each `$` as \\$",
            path.display()
        ));
    }
    match dotenvy::from_path(&path) {
        Ok(()) => Ok(()),
        Err(dotenvy::Error::LineParse(..)) => {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // The first line that does not parse on its own (a value quoted
            // over several lines is the rare case this names less exactly).
            let line = text
                .lines()
                .position(|l| dotenvy::from_read_iter(l.as_bytes()).any(|item| item.is_err()))
                .map_or_else(|| "a line".to_string(), |i| format!("line {}", i + 1));
            Err(format!(
                "{}: {line} is not NAME=value (quote values with spaces, # or \\); \
                 the lines after it were not read: fix or remove it",
                path.display()
            ))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The `.env` dotenvy would read from `dir`.
fn find_dotenv(dir: &std::path::Path) -> Result<std::path::PathBuf, ()> {
    for d in dir.ancestors() {
        let candidate = d.join(".env");
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() => return Ok(candidate),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Ok(candidate),
        }
    }
    Err(())
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    say!("error: {e}");
    ExitCode::from(2)
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let Some(rt) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::from(1);
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ingress = cogrelay::serve::listen_all_interfaces(cfg.ingress.port)
        .with_context(|| format!("failed to listen on port {} (PORT)", cfg.ingress.port))?;
    let admin = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("failed to listen on {} (ADMIN_LISTEN)", cfg.admin.listen))?;
    cogrelay::serve::run_reloadable(cfg, ingress, admin, shutdown_signal(), reload_signal()).await
}

/// SIGHUP, as reload requests (SPEC §7: the destinations file read again).
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            // One reload waiting is enough: a second SIGHUP meanwhile reads the same file.
            let _ = tx.try_send(());
        }
    });
    #[cfg(not(unix))]
    drop(tx);
    rx
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
