//! The queue's settings (`COGRELAY_QUEUE`, the data directory, Redis), shared
//! by `serve`, `jobs` and `queue`.

use std::path::PathBuf;
use std::time::Duration;

use super::{bad, parse_num, ConfigError};
use crate::queue::embedded::Fsync;
use crate::queue::{QueueKind, QueueSettings, StoreSettings};
use crate::secret::Secret;

/// The queue's settings from the flags `serve`, `jobs` and `queue` share. What
/// it keeps (`retention`) is the relay's business: the tools, which write no
/// new jobs, get [`TOOL_RETENTION`].
pub fn store_settings(a: &crate::cli::StoreArgs) -> Result<StoreSettings, ConfigError> {
    let kind = match a.queue.as_deref().map(str::trim) {
        Some("embedded") => QueueKind::Embedded,
        Some("redis") => QueueKind::Redis,
        Some(other) => {
            return Err(bad(format!(
                "COGRELAY_QUEUE={other:?} is not valid: use `embedded` or `redis`"
            )))
        }
        None if a.redis_url.is_some() || a.redis_host.is_some() => QueueKind::Redis,
        None => QueueKind::Embedded,
    };
    let redis_port: u16 = parse_num("REDIS_PORT", &a.redis_port, "a port number")?;
    let redis_url = Secret::new(match (&a.redis_url, &a.redis_host) {
        (Some(url), _) if !url.trim().is_empty() => {
            let url = url.trim();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(bad("REDIS_URL is not valid: use redis://[user:password@]host:port[/db] or rediss://..."));
            }
            url.to_string()
        }
        (_, Some(host)) if !host.trim().is_empty() => {
            format!("redis://{}:{redis_port}", host.trim())
        }
        _ => format!("redis://127.0.0.1:{redis_port}"),
    });
    // Checked here (exit 2), not at the first connection (exit 1, which a
    // service manager restarts). Its text is not shown: it may hold a password.
    if kind == QueueKind::Redis
        && redis::IntoConnectionInfo::into_connection_info(redis_url.expose()).is_err()
    {
        let from = if a.redis_url.as_deref().is_some_and(|u| !u.trim().is_empty()) {
            "REDIS_URL"
        } else {
            "REDIS_HOST"
        };
        return Err(bad(format!("{from} does not give a valid Redis address: use redis://[user:password@]host:port[/db] (a port number, a database number) or rediss://...")));
    }
    let queue_name = a.queue_name.trim().to_string();
    // A destination's queue is `QUEUE_NAME.<name>`: with a dot, one relay's
    // queue could be another's destination queue (`cog.staging` is `cog`'s
    // `staging`), whose jobs it would count, retry and prune as its own.
    if queue_name.is_empty() || queue_name.contains([':', '.']) {
        return Err(bad(format!(
            "QUEUE_NAME={:?} is not valid: use a non-empty name without ':' or '.' (a destination's queue is QUEUE_NAME.<destination>)",
            a.queue_name
        )));
    }
    let fsync = match a.fsync.trim() {
        "always" => Fsync::Always,
        "off" => Fsync::Off,
        other => {
            return Err(bad(format!(
                "COGRELAY_FSYNC={other:?} is not valid: use `always` (survives power loss) or `off`"
            )))
        }
    };
    let redis_ca = match a.redis_ca_file.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            bad(format!("REDIS_CA_FILE={path:?} cannot be read ({e}): give the PEM file of the CA that signed Redis's certificate"))
        })?),
    };
    if redis_ca.is_some() && !redis_url.expose().starts_with("rediss://") {
        return Err(bad("REDIS_CA_FILE is set but REDIS_URL is not rediss://: use rediss://host:port for TLS, or unset REDIS_CA_FILE"));
    }
    Ok(StoreSettings {
        kind,
        data_dir: PathBuf::from(&a.data_dir),
        fsync,
        max_db_bytes: 0,
        redis_url,
        queue_name,
        redis_ca,
        retention: TOOL_RETENTION,
        clock: Default::default(),
    })
}

/// What the tools' open of the queue keeps: they write no new jobs and prune
/// nothing, so the values only have to be harmless.
pub const TOOL_RETENTION: QueueSettings = QueueSettings {
    dedup_ttl: Duration::from_secs(86_400),
    remove_on_complete: u32::MAX,
};
