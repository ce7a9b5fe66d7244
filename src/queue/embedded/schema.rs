//! The store's tables and indexes (their design: the module doc of [`super`]).

pub(super) const SCHEMA_VERSION: i64 = 2;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    bot_id TEXT,
    event_type TEXT,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts_made INTEGER NOT NULL DEFAULT 0,
    due_at_ms INTEGER NOT NULL,
    lease_token TEXT,
    lease_until_ms INTEGER,
    created_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    failed_reason TEXT,
    stalls INTEGER NOT NULL DEFAULT 0,
    attempts_log TEXT NOT NULL DEFAULT '[]'
);
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs(seq) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs(seq) WHERE state = 'completed';
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(due_at_ms, seq) WHERE state IN ('waiting','delayed');
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_until_ms) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS dedup (
    event_key TEXT PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup(expires_at_ms);
";
