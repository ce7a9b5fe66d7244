//! `cogrelay sim`: its flags into [`SimOptions`].

use std::time::Duration;

use super::ConfigError;
use crate::cli::SimArgs;
use crate::cognigy::RateLimit;
use crate::secret::Secret;
use crate::sim::SimOptions;

/// A year: the simulator's tokens last at most this long (an `Instant` that
/// far ahead is still one).
const MAX_TOKEN_TTL_SECS: u64 = 365 * 86_400;

/// The simulator's options, or the one line naming what is wrong.
pub fn sim_options(a: &SimArgs) -> Result<SimOptions, ConfigError> {
    let num = |name: &str, raw: &str| -> Result<u64, ConfigError> {
        raw.trim()
            .parse()
            .map_err(|_| ConfigError(format!("{name}={raw:?} is not valid: use a whole number")))
    };
    let at_most = |name: &str, raw: &str, max: u64| -> Result<u64, ConfigError> {
        let n = num(name, raw)?;
        if n > max {
            return Err(ConfigError(format!(
                "{name}={n} is out of range: use 0 to {max}"
            )));
        }
        Ok(n)
    };
    num("--port", &a.port).and_then(|p| {
        u16::try_from(p).map_err(|_| ConfigError(format!("--port={p} is out of range")))
    })?;
    Ok(SimOptions {
        client_id: a.client_id.clone(),
        client_secret: a.client_secret.clone().map(Secret::new),
        api_key: a.api_key.clone().map(Secret::new),
        token_ttl: Duration::from_secs(at_most(
            "--token-ttl-secs",
            &a.token_ttl_secs,
            MAX_TOKEN_TTL_SECS,
        )?),
        pending_polls: at_most("--pending-polls", &a.pending_polls, u32::MAX.into())? as u32,
        rate_limit: RateLimit {
            max: at_most("--rate-limit", &a.rate_limit, u32::MAX.into())? as u32,
            per: Duration::from_secs(60),
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<crate::sim::SimOptions, super::ConfigError> {
        let mut argv = vec!["cogrelay", "sim"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap accepts the strings");
        let crate::cli::Command::Sim(a) = cli.command else {
            panic!("sim")
        };
        super::sim_options(&a)
    }

    /// A value its field cannot hold is named (a token lifetime of u64::MAX
    /// seconds panicked at each token request; a rate limit of 2^32 became
    /// 0, every request a 429).
    #[test]
    fn values_out_of_range_are_named_not_wrapped() {
        for (flag, value) in [
            ("--token-ttl-secs", "18446744073709551615"),
            ("--rate-limit", "4294967296"),
            ("--pending-polls", "4294967296"),
        ] {
            let err = parse(&[flag, value]).expect_err("refused");
            assert!(
                err.to_string()
                    .contains(&format!("{flag}={value} is out of range")),
                "{err}"
            );
        }
        let ok = parse(&["--rate-limit", "4294967295", "--token-ttl-secs", "31536000"])
            .expect("at the limits");
        assert_eq!(ok.rate_limit.max, u32::MAX);
    }
}
