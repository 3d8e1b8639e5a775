//! Opening `DIR`: the lock, the checks that refuse a database that is not ours (before SQLite
//! may write to it), creation, and the schema version.

use log::info;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const DB_FILE: &str = "taskstream.db";
pub const LOCK_FILE: &str = "taskstream.lock";

/// `PRAGMA application_id`: "TSKS". Set when the database is created, so a database of another
/// application (or of nothing) is recognised from its header alone.
pub const APPLICATION_ID: u32 = 0x5453_4b53;

/// `PRAGMA user_version` of the schema below. Version 1 already keeps what the compacted catch-up
/// (issue 15) needs: each task's latest event id and the tombstones. Version 2 adds the webhook
/// positions (`SCHEMA_V2`); a version 1 database is upgraded in place as it opens.
pub const SCHEMA_VERSION: u32 = 2;

/// How long a statement waits for SQLite's own locks; writes are serialised in-process first,
/// so this only covers the checkpoint and a reader starting during a WAL reset.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 1. `events.seq` is the second group of the event id (the first is `meta.epoch`);
/// `meta.floor` is the newest trimmed seq, so the log is complete after it. `kind` is 0 for
/// `task_updated`, 1 for `task_deleted`; `data` is the SSE `data` JSON, byte for byte.
const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE tasks (task_id TEXT PRIMARY KEY, task BLOB NOT NULL, event INTEGER NOT NULL);
CREATE INDEX tasks_by_event ON tasks (event);
CREATE TABLE events (seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, task_id TEXT NOT NULL,
                     data BLOB NOT NULL);
CREATE TABLE tombstones (task_id TEXT PRIMARY KEY, event INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX tombstones_by_event ON tombstones (event);
CREATE TABLE idempotency (key TEXT PRIMARY KEY, event INTEGER NOT NULL, task BLOB NOT NULL,
                          expires INTEGER NOT NULL);
CREATE INDEX idempotency_by_expiry ON idempotency (expires);
";

/// Version 2: each webhook worker's position, keyed by the SHA-256 of its URL (so no credential
/// is stored); `position` is the event id as text, everything up to it delivered or dead-lettered.
const SCHEMA_V2: &str = "
CREATE TABLE webhooks (key TEXT PRIMARY KEY, position TEXT NOT NULL) WITHOUT ROWID;
";

/// The tables of each schema version, sorted by name.
fn tables_of(version: u32) -> &'static [&'static str] {
    match version {
        1 => &["events", "idempotency", "meta", "tasks", "tombstones"],
        _ => &[
            "events",
            "idempotency",
            "meta",
            "tasks",
            "tombstones",
            "webhooks",
        ],
    }
}

/// Why `DIR` cannot be used; the message is what the operator reads before the exit.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// Holds `DIR/taskstream.lock` with `flock` for as long as it lives: the kernel drops the lock
/// when the process ends in any way, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

pub fn lock(dir: &Path) -> Result<DirLock, OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        OpenError(format!(
            "--data-dir {}: cannot create it: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| OpenError(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_owned(),
                pid => format!("taskstream process {pid}"),
            };
            return Err(OpenError(format!(
                "--data-dir {} is in use by {holder} (it holds {}); one process per directory",
                dir.display(),
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(OpenError(format!(
                "{}: cannot lock it: {e}",
                path.display()
            )))
        }
    }
    // The pid is only information for the next process that finds the lock taken.
    let written = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        return Err(OpenError(format!("{}: {e}", path.display())));
    }
    Ok(DirLock { _file: file })
}

/// What the database says about itself.
pub struct Meta {
    /// The first group of every event id: the millisecond the database was created.
    pub epoch: u64,
    /// The log holds every event after this seq.
    pub floor: u64,
    /// The newest seq ever issued (or `floor` when there was none after it).
    pub head: u64,
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

/// Opens `DIR/taskstream.db` for writing, creating it if missing. A file that is not a
/// taskstream database of a version this build knows is refused before SQLite writes anything.
pub fn open(dir: &Path, synchronous: &str) -> Result<(Connection, Meta), OpenError> {
    let path = db_path(dir);
    let existing = std::fs::metadata(&path)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    let conn = if existing {
        check_header(&path)?;
        open_existing(&path)?
    } else {
        create(&path)?
    };
    configure(&conn, synchronous).map_err(|e| sqlite_error(&path, e))?;
    let meta = read_meta(&conn).map_err(|e| sqlite_error(&path, e))?;
    Ok((conn, meta))
}

/// Settings of every connection that writes. WAL lets replays read while the writer commits;
/// checkpoints are the housekeeper's job (`wal_autocheckpoint` 0), so no publish waits for one.
pub fn configure(conn: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(damaged(format!("journal_mode stays {mode}, WAL is needed")));
    }
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Without a limit the WAL file keeps its largest size after a checkpoint resets it.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(())
}

/// A connection for replays: read-only, so a bug there cannot write.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The first 100 bytes of an SQLite file are its header: the magic string, and at offsets 60 and
/// 68 the `user_version` and `application_id` (big-endian). Reading them ourselves means a
/// foreign file is refused without SQLite ever opening it for writing.
fn check_header(path: &Path) -> Result<(), OpenError> {
    let mut header = [0u8; 100];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut header));
    let refuse = |why: &str| {
        Err(OpenError(format!(
            "{} {why}; refusing to use it (it was not changed). Move it away, or point --data-dir elsewhere",
            path.display()
        )))
    };
    if let Err(e) = read {
        return refuse(&format!("cannot be read as a database ({e})"));
    }
    if &header[..16] != b"SQLite format 3\0" {
        return refuse("is not an SQLite database");
    }
    let word = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let (version, application) = (word(60), word(68));
    if application != APPLICATION_ID {
        return refuse(&format!(
            "is an SQLite database of another application (application_id {application:#x}, taskstream's is {APPLICATION_ID:#x})"
        ));
    }
    if version > SCHEMA_VERSION {
        return refuse(&format!(
            "has schema version {version}, from a newer taskstream; this one knows versions up to {SCHEMA_VERSION} (see docs/operations.md, Upgrades)"
        ));
    }
    if version == 0 {
        return refuse(
            "has taskstream's application id but no schema version (its creation never completed)",
        );
    }
    Ok(())
}

fn open_existing(path: &Path) -> Result<Connection, OpenError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_error(path, e))?;
    // Closing the last connection checkpoints the WAL into the database file; a database refused
    // below must be closed without that, so it stays byte for byte as it was.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(|e| sqlite_error(path, e))?;
    let refused = |why: String| {
        OpenError(format!(
            "{} is damaged or not taskstream's ({why}); refusing to use it (it was not changed). Restore a backup, or move it away",
            path.display()
        ))
    };
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| refused(e.to_string()))?;
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| refused(e.to_string()))?;
    if tables != tables_of(version) {
        return Err(refused(format!("its tables are {tables:?}")));
    }
    read_meta(&conn).map_err(|e| refused(e.to_string()))?;
    migrate(&conn, version).map_err(|e| sqlite_error(path, e))?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
        .map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

/// Upgrades an older schema in place, one version per transaction (docs/operations.md, Upgrades,
/// says what each step does).
fn migrate(conn: &Connection, version: u32) -> rusqlite::Result<()> {
    debug_assert!((1..=SCHEMA_VERSION).contains(&version));
    if version < 2 {
        // 1 -> 2: the webhook positions. Nothing else changes, so it is one new table.
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V2} PRAGMA user_version = 2; COMMIT;"
        ))?;
        info!("sqlite: upgraded the schema from version 1 to 2 (webhook positions)");
    }
    Ok(())
}

/// Creates the schema in one transaction in rollback-journal mode, so the header (application id
/// and version) is in the database file itself once the transaction commits, not only in a WAL;
/// then switches to WAL for good.
fn create(path: &Path) -> Result<Connection, OpenError> {
    let conn = Connection::open(path).map_err(|e| sqlite_error(path, e))?;
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1);
    let sql = format!(
        "BEGIN;
         {SCHEMA_V1}
         {SCHEMA_V2}
         INSERT INTO meta (key, value) VALUES ('epoch', {epoch}), ('floor', 0), ('tombstone_floor', 0);
         PRAGMA application_id = {APPLICATION_ID};
         PRAGMA user_version = {SCHEMA_VERSION};
         COMMIT;"
    );
    conn.execute_batch(&sql)
        .map_err(|e| sqlite_error(path, e))?;
    info!(
        "sqlite: created {} (schema version {SCHEMA_VERSION})",
        path.display()
    );
    Ok(conn)
}

fn read_meta(conn: &Connection) -> rusqlite::Result<Meta> {
    let value = |key: &str| -> rusqlite::Result<u64> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?
            .ok_or_else(|| damaged(format!("meta has no {key}")))
    };
    let epoch = value("epoch")?;
    let floor = value("floor")?;
    let newest: Option<u64> = conn.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
    Ok(Meta {
        epoch,
        floor,
        head: newest.unwrap_or(0).max(floor),
    })
}

fn sqlite_error(path: &Path, e: rusqlite::Error) -> OpenError {
    OpenError(format!("{}: {e}", path.display()))
}

/// A rusqlite error for stored data that SQLite read fine but that is not what taskstream wrote.
pub fn damaged(what: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(what.into())
}
