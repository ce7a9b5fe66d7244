//! The job listing that the admin API (`GET /admin/jobs`) and `cogrelay jobs
//! list` both offer: one parse of its query, one JSON shape of its answer.

use serde_json::{json, Value};

use crate::queue::{DestinationName, JobState, Page};

/// Jobs in one page at the most.
pub const MAX_LIMIT: u64 = 500;
/// The largest `offset`: 2^53, an integer JSON readers take exactly (the
/// answer echoes it), and far within the stores' signed 64 bits, where a
/// larger one wrapped to a negative offset: the first page.
pub const MAX_OFFSET: u64 = 1 << 53;

/// A validated listing query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// `None`: every state.
    pub state: Option<JobState>,
    /// `None`: every destination.
    pub destination: Option<DestinationName>,
    pub offset: u64,
    pub limit: u64,
}

/// Which part of the query is wrong, with the raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingError {
    State(String),
    Offset(String),
    Limit(String),
    Destination(String),
}

impl ListingError {
    /// What is wrong and what is allowed, for a message that names the
    /// parameter as the caller spells it (`state` or `--state`).
    pub fn explain(&self, prefix: &str) -> String {
        match self {
            Self::State(raw) => format!(
                "{prefix}state {raw:?} is not valid: use waiting, active, delayed, completed or failed"
            ),
            Self::Offset(raw) => format!(
                "{prefix}offset {raw:?} is not valid: use a whole number from 0 to {MAX_OFFSET}"
            ),
            Self::Limit(raw) => format!(
                "{prefix}limit {raw:?} is not valid: use a whole number from 1 to {MAX_LIMIT}"
            ),
            Self::Destination(raw) => format!(
                "{prefix}destination {raw:?} is not valid: a destination's name is 1 to 32 of a-z, 0-9, - and _"
            ),
        }
    }
}

impl Listing {
    /// From the raw parameters; an absent one takes its default (every state,
    /// offset 0, `default_limit`); `state` may also be empty or `all`.
    pub fn parse(
        state: Option<&str>,
        offset: Option<&str>,
        limit: Option<&str>,
        default_limit: u64,
    ) -> Result<Self, ListingError> {
        let state = match state.map(str::trim) {
            None | Some("") | Some("all") => None,
            Some(raw) => Some(JobState::parse(raw).ok_or_else(|| ListingError::State(raw.into()))?),
        };
        let number = |raw: Option<&str>, default: u64| match raw.map(str::trim) {
            None => Some(default),
            Some(s) => s.parse::<u64>().ok(),
        };
        let offset = number(offset, 0)
            .filter(|n| *n <= MAX_OFFSET)
            .ok_or_else(|| ListingError::Offset(offset.unwrap_or_default().into()))?;
        let limit = number(limit, default_limit)
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ListingError::Limit(limit.unwrap_or_default().into()))?;
        Ok(Self {
            state,
            destination: None,
            offset,
            limit,
        })
    }

    /// Only the jobs of this destination (absent: every one).
    pub fn with_destination(self, raw: Option<&str>) -> Result<Self, ListingError> {
        Ok(Self {
            destination: destination(raw)?,
            ..self
        })
    }

    /// The answer: `{"items", "total", "offset", "limit"}`.
    pub fn answer(&self, page: &Page) -> Value {
        json!({ "items": page.items, "total": page.total, "offset": self.offset, "limit": self.limit })
    }
}

/// A `destination` parameter: absent is every destination; present, it
/// must name one (an empty one, such as a script's unset variable, is an
/// error, not "every destination": a bulk retry must not widen on a typo).
pub fn destination(raw: Option<&str>) -> Result<Option<DestinationName>, ListingError> {
    match raw.map(str::trim) {
        None => Ok(None),
        Some(d) => DestinationName::parse(d)
            .map(Some)
            .ok_or_else(|| ListingError::Destination(d.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_ranges_and_errors() {
        let ok = Listing::parse(None, None, None, 50).expect("defaults");
        assert_eq!(
            ok,
            Listing {
                state: None,
                destination: None,
                offset: 0,
                limit: 50
            }
        );
        let ok = Listing::parse(Some("failed"), Some("10"), Some("500"), 20).expect("valid");
        assert_eq!(
            ok,
            Listing {
                state: Some(JobState::Failed),
                destination: None,
                offset: 10,
                limit: 500
            }
        );
        assert_eq!(
            Listing::parse(Some("all"), None, None, 20).map(|l| l.state),
            Ok(None)
        );
        assert_eq!(
            Listing::parse(Some("dead"), None, None, 20),
            Err(ListingError::State("dead".into()))
        );
        for bad in ["-1", "9007199254740993", "18446744073709551615"] {
            assert_eq!(
                Listing::parse(None, Some(bad), None, 20),
                Err(ListingError::Offset(bad.into())),
                "beyond what the stores take (SQLite's i64) and JSON reads exactly"
            );
        }
        assert_eq!(
            Listing::parse(None, Some("9007199254740992"), None, 20).map(|l| l.offset),
            Ok(MAX_OFFSET)
        );
        for bad in ["0", "501", "x"] {
            assert_eq!(
                Listing::parse(None, None, Some(bad), 20),
                Err(ListingError::Limit(bad.into()))
            );
        }
        let any = Listing::parse(None, None, None, 20).expect("defaults");
        assert_eq!(
            any.clone()
                .with_destination(Some(" crm "))
                .map(|l| l.destination),
            Ok(DestinationName::parse("crm"))
        );
        for bad in ["", " ", "Crm", "a/b"] {
            assert_eq!(
                any.clone().with_destination(Some(bad)),
                Err(ListingError::Destination(bad.trim().into())),
                "an empty or wrong destination is an error, never every destination"
            );
        }
        assert_eq!(
            ListingError::Limit("0".into()).explain("--"),
            "--limit \"0\" is not valid: use a whole number from 1 to 500"
        );
    }
}
