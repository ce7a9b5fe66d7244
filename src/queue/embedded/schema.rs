//! The store's tables and indexes (their design: the module doc of [`super`]).

/// 5: a bundle's removed slot is `~` (a version-4 relay would deliver it to
/// a destination of that name), so a version-4 relay refuses the store.
/// 6: ordered jobs (`order_key`, `order_hold`), which a version-5 relay
/// would deliver out of order.
/// 7: a key's later jobs parked (due at `keys.rs` `PARKED`), which a
/// version-6 relay would never deliver; the tools' count of removed ordered
/// jobs (`changes`).
pub(super) const SCHEMA_VERSION: i64 = 7;

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
    attempts_log TEXT NOT NULL DEFAULT '[]',
    destination TEXT NOT NULL DEFAULT 'default',
    pending TEXT,
    order_key TEXT,
    order_hold INTEGER NOT NULL DEFAULT 0
);
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs(seq) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs(seq) WHERE state = 'completed';
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_due_by_destination ON jobs(destination, due_at_ms, seq) WHERE state IN ('waiting','delayed');
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_until_ms) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS jobs_bundled ON jobs(seq) WHERE pending IS NOT NULL;
DROP INDEX IF EXISTS jobs_order_open;
DROP INDEX IF EXISTS jobs_order;
DROP INDEX IF EXISTS jobs_order_key;
DROP INDEX IF EXISTS jobs_by_key;
CREATE TABLE IF NOT EXISTS changes (what TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    event_key TEXT PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    jobs TEXT,
    bot TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup(expires_at_ms);
CREATE TABLE IF NOT EXISTS paused (destination TEXT PRIMARY KEY) WITHOUT ROWID;
";

/// Columns added since the first schema, for a store written by an older
/// version (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it is):
/// (table, column, definition). Version 3: a job's destination (existing jobs
/// are the `default` destination's), and every job of a deduplicated event
/// (`destination=seq,...`; NULL in older rows: the one `job_seq`). Version
/// 4: a bundle's pending destinations (see the module doc of [`super`]).
/// Version 6: an ordered job's key, and whether a failure holds it. Then,
/// in version 7 (a store of version 7 without it reads as before): the
/// botId of an envelope that may share its key with another
/// (`Event::key_sharer`).
pub(super) const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("jobs", "destination", "TEXT NOT NULL DEFAULT 'default'"),
    ("dedup", "jobs", "TEXT"),
    ("jobs", "pending", "TEXT"),
    ("jobs", "order_key", "TEXT"),
    ("jobs", "order_hold", "INTEGER NOT NULL DEFAULT 0"),
    ("dedup", "bot", "TEXT"),
];
