//! Where each relay of a shared queue delivers a destination, so that two
//! relays whose files give one name two URLs are told (each delivers what
//! it claims with its own file: the destination's events are split between
//! the two URLs, unseen). Per destination, the hash
//! `bull:QUEUE_NAME:cg:target:<destination>`: a field per relay (its name),
//! valued `<fingerprint> <ms>`, the fingerprint a digest of the URL
//! without its credentials and query (`serve/targets.rs`), the time
//! Redis's own (`TIME`: the hosts' clocks may disagree). Each relay writes
//! its fields and reads the others' (every 30 s and after a reload), and
//! deletes its own when it stops; a field not written for
//! [`TARGET_STALE_MS`] is a relay that is gone (killed), deleted by the
//! next relay that reads it.

use std::collections::HashMap;

use super::{bounded, QueueResult, RedisQueues};
use crate::queue::DestinationName;

/// A relay's field not written for this long (three looks) is a relay gone.
const TARGET_STALE_MS: i64 = 90_000;

/// A hash no relay wrote for a day (its destination is in no file) goes.
const TARGET_KEEP_MS: i64 = 86_400_000;

/// Deletes a gone relay's field unless it was written again since it was read.
const FORGET_IF_UNCHANGED: &str = r#"
if redis.call("HGET", KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call("HDEL", KEYS[1], ARGV[1])
end
return 0
"#;

/// A destination some other relay delivers to another URL: the names of
/// those relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConflict {
    pub destination: DestinationName,
    pub relays: Vec<String>,
}

impl RedisQueues {
    /// Writes `relay`'s fingerprint of each destination's URL (`targets`),
    /// and answers the destinations another relay gives another URL.
    pub async fn compare_targets(
        &self,
        relay: &str,
        targets: &[(DestinationName, String)],
    ) -> QueueResult<Vec<TargetConflict>> {
        let (secs, micros): (i64, i64) = self.base.raw(&redis::cmd("TIME")).await?;
        let now_ms = secs * 1000 + micros / 1000;
        let mut pipe = redis::pipe();
        for (destination, fingerprint) in targets {
            let key = self.target_key(destination);
            pipe.cmd("HSET")
                .arg(&key)
                .arg(relay)
                .arg(format!("{fingerprint} {now_ms}"))
                .ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(TARGET_KEEP_MS).ignore();
            pipe.cmd("HGETALL").arg(&key);
        }
        let seen: Vec<HashMap<String, String>> = self.base.pipe(&pipe).await?;
        let mut conflicts = Vec::new();
        let mut gone = Vec::new();
        for ((destination, fingerprint), fields) in targets.iter().zip(seen) {
            let mut relays = Vec::new();
            for (other, value) in fields {
                if other == relay {
                    continue;
                }
                let (theirs, at) = value.split_once(' ').unwrap_or((&value, ""));
                if now_ms - at.parse::<i64>().unwrap_or(0) > TARGET_STALE_MS {
                    gone.push((self.target_key(destination), other, value));
                } else if theirs != fingerprint {
                    relays.push(other);
                }
            }
            if !relays.is_empty() {
                relays.sort();
                conflicts.push(TargetConflict {
                    destination: destination.clone(),
                    relays,
                });
            }
        }
        let forget = redis::Script::new(FORGET_IF_UNCHANGED);
        for (key, field, value) in gone {
            let mut conn = self.base.conn.connection();
            let mut call = forget.key(key);
            call.arg(field).arg(value);
            if let Err(e) = bounded(call.invoke_async::<i64>(&mut conn)).await {
                tracing::debug!(error = %e, "forgetting a gone relay's target");
            }
        }
        Ok(conflicts)
    }

    /// Deletes `relay`'s fields (it stops): the others no longer count it.
    pub async fn forget_targets(
        &self,
        relay: &str,
        destinations: &[DestinationName],
    ) -> QueueResult<()> {
        let mut pipe = redis::pipe();
        for destination in destinations {
            pipe.cmd("HDEL")
                .arg(self.target_key(destination))
                .arg(relay)
                .ignore();
        }
        self.base.pipe(&pipe).await
    }

    fn target_key(&self, destination: &DestinationName) -> String {
        self.base.hot.key(&format!("cg:target:{destination}"))
    }
}
