//! `cogrelay sim`: its flags into [`SimOptions`].

use std::time::Duration;

use super::ConfigError;
use crate::cli::SimArgs;
use crate::cognigy::RateLimit;
use crate::secret::Secret;
use crate::sim::SimOptions;

/// The simulator's options, or the one line naming what is wrong.
pub fn sim_options(a: &SimArgs) -> Result<SimOptions, ConfigError> {
    let num = |name: &str, raw: &str| -> Result<u64, ConfigError> {
        raw.trim()
            .parse()
            .map_err(|_| ConfigError(format!("{name}={raw:?} is not valid: use a whole number")))
    };
    num("--port", &a.port).and_then(|p| {
        u16::try_from(p).map_err(|_| ConfigError(format!("--port={p} is out of range")))
    })?;
    Ok(SimOptions {
        client_id: a.client_id.clone(),
        client_secret: a.client_secret.clone().map(Secret::new),
        api_key: a.api_key.clone().map(Secret::new),
        token_ttl: Duration::from_secs(num("--token-ttl-secs", &a.token_ttl_secs)?),
        pending_polls: num("--pending-polls", &a.pending_polls)? as u32,
        rate_limit: RateLimit {
            max: num("--rate-limit", &a.rate_limit)? as u32,
            per: Duration::from_secs(60),
        },
        ..Default::default()
    })
}
