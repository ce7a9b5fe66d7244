//! `cogrelay jobs ...` and `cogrelay queue stats`: the operator's commands for
//! the dead-letter queue, on the queue itself (not through a relay's admin
//! API), so they work whether or not a relay runs.
//!
//! Embedded: the store is opened *shared* (no process lock, no recovery of
//! active jobs; SQLite's WAL locking keeps our writes apart from the relay's,
//! and a running relay picks a retried job up within its 1 s idle poll).
//! Redis: a plain BullMQ client of the same queue.
//!
//! Exit codes: 0 ok (a destinations list with rows that cannot be read too:
//! they say so, as the admin API's 200 does), 1 the queue cannot be reached,
//! 2 a bad argument, 3 no such job or destination, 4 a state that does not
//! allow the change.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::cli::{DestinationsCommand, JobsCommand, QueueCommand};
use crate::listing::Listing;
use crate::queue::{
    self, DestinationName, JobView, OpenError, Opener, Queue, QueueError, Store, StoreSettings,
};

/// What went wrong, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Job(QueueError),
    #[error("{0}")]
    Unavailable(String),
    /// A destination neither the queue nor a file names (no file was read).
    #[error("{0}")]
    Unknown(String),
}

impl CliError {
    /// 1 the queue cannot be reached; 2 a bad argument; 3 no such job or
    /// destination; 4 the job's state does not allow the change (a script
    /// can tell "already retried" from "never existed").
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unavailable(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unknown(_)
            | CliError::Job(QueueError::NotFound(_) | QueueError::UnknownDestination(_)) => 3,
            CliError::Job(_) => 4,
        }
    }
}

impl From<QueueError> for CliError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Unavailable(m) => CliError::Unavailable(m),
            other => CliError::Job(other),
        }
    }
}

/// The operation to run, parsed from either command.
#[derive(Debug)]
pub enum Op {
    Jobs(JobsCommand),
    Stats,
    Destinations(DestinationsCommand),
}

impl From<QueueCommand> for Op {
    fn from(c: QueueCommand) -> Self {
        match c {
            QueueCommand::Stats => Op::Stats,
        }
    }
}

impl Op {
    /// Whether the operation only reads: the queue is then opened so that
    /// nothing can be written (SPEC §7: operators' reads never write).
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Op::Stats
                | Op::Jobs(JobsCommand::List { .. } | JobsCommand::Show { .. })
                | Op::Destinations(DestinationsCommand::List)
        )
    }
}

/// Opens the queue of `store` and runs `op`; returns what to print on stdout.
/// `configured` are the names the destinations file gives (a name a command
/// takes must be one of them or one the queue knows: checked on a read-only
/// open first, so that a refused command writes nothing at all).
pub async fn run(
    store: &StoreSettings,
    op: Op,
    json: bool,
    configured: &[DestinationName],
) -> Result<String, CliError> {
    let open = |opener| async move {
        queue::open(store, opener).await.map_err(|e| match e {
            OpenError::NoEmbeddedStore(_) => CliError::Usage(e.to_string()),
            other => CliError::Unavailable(other.to_string()),
        })
    };
    if op.reads_only() {
        let q = open(Opener::Reader).await?;
        let out = execute(&q, op, json, configured).await;
        let _ = q.close().await;
        return out;
    }
    if let Some(name) = op.names() {
        let q = open(Opener::Reader).await?;
        let known = known(&q, name, configured).await.map(|_| ());
        let _ = q.close().await;
        known?;
    }
    let q = open(Opener::Tool).await?;
    let out = execute(&q, op, json, configured).await;
    let _ = q.close().await;
    out
}

impl Op {
    /// The destination a writing command names, to check first.
    fn names(&self) -> Option<&str> {
        match self {
            Op::Destinations(DestinationsCommand::Pause { name })
            | Op::Destinations(DestinationsCommand::Resume { name }) => Some(name),
            Op::Jobs(JobsCommand::Retry {
                id: None,
                destination: Some(d),
                ..
            }) => Some(d),
            _ => None,
        }
    }
}

/// `name`, if the queue or the destinations file knows it; else exit 3.
async fn known(
    q: &Store,
    name: &str,
    configured: &[DestinationName],
) -> Result<DestinationName, CliError> {
    let name = checked_name(name)?;
    if configured.contains(&name) || q.destination_names().await?.contains(&name) {
        return Ok(name);
    }
    if configured.is_empty() {
        // A destination with no jobs yet is known from the file alone.
        return Err(CliError::Unknown(format!(
            "{}; no destinations file was read: one that has no jobs yet is known from the relay's file: set COGRELAY_CONFIG to it",
            QueueError::UnknownDestination(name.to_string())
        )));
    }
    Err(CliError::Job(QueueError::UnknownDestination(
        name.to_string(),
    )))
}

async fn execute(
    q: &Store,
    op: Op,
    json: bool,
    configured: &[DestinationName],
) -> Result<String, CliError> {
    let out = match op {
        Op::Stats => {
            let c = q.counts_for(None).await?;
            if json {
                serde_json::to_string(&c).unwrap_or_default()
            } else {
                let mut t = String::from("STATE      COUNT\n");
                for (s, n) in [
                    ("waiting", c.waiting),
                    ("active", c.active),
                    ("delayed", c.delayed),
                    ("completed", c.completed),
                    ("failed", c.failed),
                ] {
                    let _ = writeln!(t, "{s:<10} {n}");
                }
                t
            }
        }
        Op::Jobs(JobsCommand::List {
            state,
            limit,
            offset,
            destination,
        }) => {
            let listing = Listing::parse(state.as_deref(), Some(&offset), Some(&limit), 20)
                .and_then(|l| l.with_destination(destination.as_deref()))
                .map_err(|e| CliError::Usage(e.explain("--")))?;
            if let Some(d) = &listing.destination {
                known(q, d, configured).await?;
            }
            let page = q
                .list_for(
                    listing.state,
                    listing.destination.as_ref(),
                    listing.offset,
                    listing.limit,
                )
                .await?;
            if json {
                listing.answer(&page).to_string()
            } else {
                list_table(&page.items, page.total, listing.offset)
            }
        }
        Op::Destinations(command) => return destinations(q, command, json, configured).await,
        Op::Jobs(JobsCommand::Show { id }) => {
            let job = q.get(&id).await?;
            if json {
                serde_json::to_string(&job).unwrap_or_default()
            } else {
                show_text(&job)
            }
        }
        Op::Jobs(JobsCommand::Retry { id: Some(id), .. }) => {
            q.retry(&id).await?;
            if json {
                json!({ "retried": 1, "jobId": id }).to_string()
            } else {
                format!("job {id} is waiting again (attempts reset)")
            }
        }
        Op::Jobs(JobsCommand::Retry {
            id: None,
            destination,
            ..
        }) => {
            let destination = match destination.as_deref() {
                Some(d) => Some(known(q, d, configured).await?),
                None => None,
            };
            let n = q.retry_all_failed_for(destination.as_ref()).await?;
            if json {
                json!({ "retried": n }).to_string()
            } else {
                format!("{n} failed job(s) waiting again (attempts reset)")
            }
        }
        Op::Jobs(JobsCommand::Remove { id }) => {
            q.remove(&id).await?;
            if json {
                json!({ "removed": 1, "jobId": id }).to_string()
            } else {
                format!("job {id} removed")
            }
        }
    };
    Ok(out)
}

/// A destination's name as given on the command line (`--destination`, or
/// the NAME of `destinations pause`), checked.
fn checked_name(raw: &str) -> Result<DestinationName, CliError> {
    DestinationName::parse(raw).ok_or_else(|| {
        CliError::Usage(format!(
            "{raw:?} is not a destination's name: a name is 1 to 32 of a-z, 0-9, - and _"
        ))
    })
}

/// A destination's state: counts, whether paused, its held keys.
type DestinationState = (crate::queue::Counts, bool, Vec<crate::queue::HeldKey>);

/// Each destination the queue has, but one with nothing in it that the
/// file does not give; one whose state cannot be read (on Redis, a key of
/// its queue a tool broke, or a queue that cannot be opened) with why, as
/// `GET /admin/destinations` shows it. An error only when none can be read.
async fn destination_rows(
    q: &Store,
    configured: &[DestinationName],
) -> Result<Vec<(DestinationName, Result<DestinationState, String>)>, CliError> {
    let mut rows = Vec::new();
    let mut unread = None;
    for name in q.destination_names().await? {
        let (counts, paused, held) = match q.destination_state(&name).await {
            Ok(state) => state,
            Err(e) => {
                let why = e.to_string();
                unread.get_or_insert(e);
                rows.push((name, Err(why)));
                continue;
            }
        };
        // One the queue names with nothing in it (Redis's `default`
        // beside a file without it) is not listed, unless the file
        // gives it (without a file, `default` is the destination).
        let c = &counts;
        let empty = c.waiting + c.active + c.delayed + c.completed + c.failed == 0;
        let given = configured.contains(&name)
            || (configured.is_empty() && name == DestinationName::DEFAULT);
        if empty && !paused && held.is_empty() && !given {
            continue;
        }
        rows.push((name, Ok((counts, paused, held))));
    }
    match unread {
        Some(e) if rows.iter().all(|(_, r)| r.is_err()) => Err(e.into()),
        _ => Ok(rows),
    }
}

/// `cogrelay destinations` (list): JSON rows, or a table with each held key
/// and each unreadable row's reason under it.
fn destinations_listed(
    rows: &[(DestinationName, Result<DestinationState, String>)],
    json: bool,
) -> String {
    if json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(name, state)| match state {
                Ok((counts, paused, held)) => json!({ "name": name, "paused": paused, "counts": counts, "held_keys": held }),
                Err(why) => json!({ "name": name, "paused": null, "counts": null, "held_keys": null, "error": why }),
            })
            .collect();
        return Value::from(list).to_string();
    }
    let mut t = format!(
        "{:<32} {:<7} {:>8} {:>7} {:>8} {:>10} {:>7} {:>5}\n",
        "DESTINATION", "PAUSED", "WAITING", "ACTIVE", "DELAYED", "COMPLETED", "FAILED", "HELD"
    );
    for (name, state) in rows {
        // `?` for what cannot be read.
        let cells = match state {
            Ok((c, paused, held)) => [
                (if *paused { "yes" } else { "no" }).to_string(),
                c.waiting.to_string(),
                c.active.to_string(),
                c.delayed.to_string(),
                c.completed.to_string(),
                c.failed.to_string(),
                held.len().to_string(),
            ],
            Err(_) => std::array::from_fn(|_| "?".to_string()),
        };
        let [paused, waiting, active, delayed, completed, failed, held] = cells;
        let _ = writeln!(
            t,
            "{name:<32} {paused:<7} {waiting:>8} {active:>7} {delayed:>8} {completed:>10} {failed:>7} {held:>5}"
        );
    }
    // Each held key: what holds it, and what to do; each row that
    // could not be read: why.
    for (name, state) in rows {
        let held = match state {
            Ok((_, _, held)) => held,
            Err(why) => {
                let _ = writeln!(t, "unreadable: {name}: {why}");
                continue;
            }
        };
        for h in held {
            let _ = writeln!(
                t,
                "held: {name} key {:?} by failed job {} since {} (cogrelay jobs retry {} or remove {})",
                h.key,
                h.job_id,
                crate::time::rfc3339(h.since_ms),
                h.job_id,
                h.job_id
            );
        }
    }
    if rows.is_empty() {
        t.push_str("(no destination has jobs in this queue)\n");
    }
    t.trim_end().to_string()
}

/// `cogrelay destinations ...`.
async fn destinations(
    q: &Store,
    command: DestinationsCommand,
    json: bool,
    configured: &[DestinationName],
) -> Result<String, CliError> {
    let (name, paused) = match command {
        DestinationsCommand::List => {
            let rows = destination_rows(q, configured).await?;
            return Ok(destinations_listed(&rows, json));
        }
        DestinationsCommand::Pause { name } => (name, true),
        DestinationsCommand::Resume { name } => (name, false),
    };
    let name = known(q, &name, configured).await?;
    q.set_paused(&name, paused).await?;
    if paused {
        // A relay running beside this command stops starting deliveries
        // within its pause lease: answered after it (SPEC §7).
        if !json {
            // Not `eprintln!`, which panics when stderr is closed.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "pausing {name}: waiting {} s for any running relay to stop starting deliveries",
                q.pause_lease().as_secs()
            );
        }
        tokio::time::sleep(q.pause_lease() + crate::admin::PAUSE_MARGIN).await;
    }
    Ok(if json {
        json!({ "name": name, "paused": paused }).to_string()
    } else if paused {
        format!("destination {name} paused: no new delivery starts on any relay; its jobs are stored and wait until `cogrelay destinations resume {name}`")
    } else {
        format!("destination {name} resumed")
    })
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn last_answer(job: &JobView) -> String {
    job.attempts
        .last()
        .map(|a| match (a.status, &a.error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            (None, None) => "-".into(),
        })
        .unwrap_or_else(|| "-".into())
}

fn list_table(items: &[JobView], total: u64, offset: u64) -> String {
    let mut t = format!(
        "{:<8} {:<9} {:<16} {:<20} {:<36} {:>3} {:<24} {:<24} {}\n",
        "ID",
        "STATE",
        "DESTINATION",
        "TYPE",
        "EVENT KEY",
        "TRY",
        "LAST ANSWER",
        "CREATED",
        "REASON"
    );
    for j in items {
        let _ = writeln!(
            t,
            "{:<8} {:<9} {:<16} {:<20} {:<36} {:>3} {:<24} {:<24} {}",
            j.id,
            j.state.as_str(),
            cut(&j.destination, 16),
            cut(event_type(j), 20),
            cut(&j.event_key, 36),
            j.attempts_made,
            cut(&last_answer(j), 24),
            crate::time::rfc3339(j.created_at_ms),
            cut(j.failed_reason.as_deref().unwrap_or("-"), 60),
        );
    }
    if items.is_empty() {
        let _ = writeln!(t, "(no jobs)");
    }
    let shown_to = offset + items.len() as u64;
    let _ = write!(
        t,
        "{} of {total}",
        if items.is_empty() {
            "0".to_string()
        } else {
            format!("{}-{shown_to}", offset + 1)
        }
    );
    if shown_to < total {
        let _ = write!(t, "; next page: --offset {shown_to}");
    }
    t
}

/// The event's type: the envelope's `type`, or `cognigy.output` for an
/// endpoint output.
fn event_type(j: &JobView) -> &str {
    j.event_type.as_deref().unwrap_or(match j.kind {
        "endpoint_output" => crate::destination::OUTPUT_TYPE,
        other => other,
    })
}

fn show_text(j: &JobView) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "job         {}", j.id);
    let _ = writeln!(t, "state       {}", j.state.as_str());
    let _ = writeln!(t, "destination {}", j.destination);
    let _ = writeln!(t, "type        {}", event_type(j));
    let _ = writeln!(t, "event key   {}", j.event_key);
    let _ = writeln!(t, "event id    {}", j.event_id);
    if let Some(b) = &j.bot_id {
        let _ = writeln!(t, "bot         {b}");
    }
    let _ = writeln!(t, "created     {}", crate::time::rfc3339(j.created_at_ms));
    if let Some(due) = j.due_at_ms {
        let _ = writeln!(t, "due         {}", crate::time::rfc3339(due));
    }
    if let Some(r) = &j.failed_reason {
        let _ = writeln!(t, "reason      {r}");
    }
    let _ = writeln!(t, "attempts    {}", j.attempts_made);
    for a in &j.attempts {
        let answer = match (a.status, &a.error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            t,
            "  #{:<3} {}  {:>6} ms  {:<9} {}",
            a.n,
            crate::time::rfc3339(a.started_at_ms),
            a.duration_ms,
            serde_json::to_value(a.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            answer
        );
    }
    // Pretty when serde_json can build it; else as received (a lone
    // surrogate escape, a number beyond `f64`: the ingress accepts those).
    let payload = j.payload.as_ref().map_or_else(
        || "(none)".into(),
        |p| {
            serde_json::from_str::<Value>(p.get())
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| p.get().to_string())
        },
    );
    let _ = write!(t, "payload\n{payload}");
    t
}
