//! `DbError` and the classification of sqlx errors (retryable, constraint kinds).

use std::path::PathBuf;

#[cfg(any(test, feature = "test-hooks"))]
use super::fault::FaultPoint;
use super::types::{BuildId, RealisationConflict, StepNr, UnknownCode};

/// Every error of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database could not be opened at start (the URL is shown without its password).
    #[error("cannot connect to database {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("unsupported database URL {url}: expected sqlite://… or postgres://…")]
    UnsupportedUrl { url: String },
    #[error("invalid database URL {url}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create directory {} for the database: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migrating database {url} failed: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("build {0} not found")]
    BuildNotFound(BuildId),
    #[error("step {stepnr} of build {build} not found")]
    StepNotFound { build: BuildId, stepnr: StepNr },
    /// The step already has a status; finished steps are not changed again.
    #[error("step {stepnr} of build {build} is already finished")]
    StepFinished { build: BuildId, stepnr: StepNr },
    #[error("jobset {0} not found")]
    JobsetNotFound(String),
    #[error("evaluation {0} not found")]
    EvalNotFound(i64),
    #[error(transparent)]
    RealisationConflict(#[from] RealisationConflict),
    /// A caller passed something the schema forbids (e.g. `finish_step` with `Resolved`).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A row holds a value the types cannot represent (e.g. an unknown status code).
    #[error("unexpected value in database: {0}")]
    Corrupt(#[from] UnknownCode),
    /// The connection was lost while committing: the transaction may or may not have been
    /// committed. The write operations find out by reading ([`super::retry_checked`]); this
    /// reaches a caller only from `retry` (which does not check).
    #[error("connection lost while committing; the outcome is unknown: {0}")]
    CommitOutcomeUnknown(#[source] sqlx::Error),
    /// A test armed this fault point (see `Db::arm_fault`; feature `test-hooks` only).
    #[cfg(any(test, feature = "test-hooks"))]
    #[error("fault injected at {0:?}")]
    FaultInjected(FaultPoint),
    #[error("the queue listener's task has stopped")]
    ListenerClosed,
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Why an error is worth another try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// PostgreSQL 40001.
    SerializationFailure,
    /// PostgreSQL 40P01.
    Deadlock,
    /// SQLite `SQLITE_BUSY` / `SQLITE_LOCKED` (and their extended codes).
    Busy,
    /// The connection was lost or could not be (re)established in time.
    ConnectionLost,
}

impl DbError {
    /// `Some` when retrying the whole operation may succeed.
    pub fn transient(&self) -> Option<Transient> {
        match self {
            DbError::Sql(e) => classify(e),
            _ => None,
        }
    }

    /// True when the operation may succeed if run again.
    pub fn is_retryable(&self) -> bool {
        self.transient().is_some()
    }

    /// The constraint kind when the database rejected a row.
    pub fn constraint_kind(&self) -> Option<sqlx::error::ErrorKind> {
        match self {
            DbError::Sql(sqlx::Error::Database(d)) => match d.kind() {
                sqlx::error::ErrorKind::Other => None,
                k => Some(k),
            },
            _ => None,
        }
    }

    /// True when a check constraint rejected a row.
    pub fn is_check_violation(&self) -> bool {
        matches!(
            self.constraint_kind(),
            Some(sqlx::error::ErrorKind::CheckViolation)
        )
    }

    /// True when a foreign key rejected a row.
    pub fn is_foreign_key_violation(&self) -> bool {
        matches!(
            self.constraint_kind(),
            Some(sqlx::error::ErrorKind::ForeignKeyViolation)
        )
    }
}

/// Classifies a sqlx error as transient or not.
pub fn classify(e: &sqlx::Error) -> Option<Transient> {
    match e {
        sqlx::Error::Database(d) => classify_code(d.code().as_deref()?),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => Some(Transient::ConnectionLost),
        _ => None,
    }
}

/// Classifies a database error code: a PostgreSQL SQLSTATE or an SQLite (extended) result code.
pub fn classify_code(code: &str) -> Option<Transient> {
    match code {
        "40001" => return Some(Transient::SerializationFailure),
        "40P01" => return Some(Transient::Deadlock),
        // admin_shutdown, crash_shutdown, cannot_connect_now: the server is going away or coming up.
        "57P01" | "57P02" | "57P03" => return Some(Transient::ConnectionLost),
        _ => {}
    }
    // SQLSTATE class 08: connection exception.
    if code.len() == 5 && code.starts_with("08") {
        return Some(Transient::ConnectionLost);
    }
    // SQLite: the primary result code is the low byte of the extended one.
    // 5 = SQLITE_BUSY (incl. BUSY_SNAPSHOT 517, BUSY_TIMEOUT 773), 6 = SQLITE_LOCKED.
    // SQLite's codes have at most four digits; a five-character code is a PostgreSQL SQLSTATE,
    // even when all digits (22021, invalid byte sequence, is not "busy" although 22021 & 0xff
    // is 5: it was retried forever).
    if code.len() >= 5 {
        return None;
    }
    match code.parse::<i32>() {
        Ok(n) if matches!(n & 0xff, 5 | 6) => Some(Transient::Busy),
        _ => None,
    }
}

/// `url` with any password removed (`postgres://user:secret@host/db` → `postgres://user@host/db`,
/// and a `password=` query parameter dropped), for messages and logs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            // The authority ends at the first '/'; userinfo ends at its last '@'.
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                    format!("{user}@{host}")
                }
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_string(),
    };
    if let Some(q) = query {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|kv| {
                let key = kv.split('=').next().unwrap_or("");
                !key.eq_ignore_ascii_case("password")
            })
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://qr:s3cr:et@db.example:5432/qr"),
            "postgres://qr@db.example:5432/qr"
        );
        assert_eq!(
            redact_url("postgres://qr@127.0.0.1/qr?sslmode=require&password=x"),
            "postgres://qr@127.0.0.1/qr?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://127.0.0.1/qr?password=x"),
            "postgres://127.0.0.1/qr"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/qr/qr.db"),
            "sqlite:///var/lib/qr/qr.db"
        );
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(redact_url("postgres://a:b@h"), "postgres://a@h");
    }

    #[test]
    fn classifies_codes() {
        assert_eq!(
            classify_code("40001"),
            Some(Transient::SerializationFailure)
        );
        assert_eq!(classify_code("40P01"), Some(Transient::Deadlock));
        assert_eq!(classify_code("08006"), Some(Transient::ConnectionLost));
        assert_eq!(classify_code("57P01"), Some(Transient::ConnectionLost));
        assert_eq!(classify_code("5"), Some(Transient::Busy));
        assert_eq!(classify_code("517"), Some(Transient::Busy));
        assert_eq!(classify_code("6"), Some(Transient::Busy));
        assert_eq!(classify_code("262"), Some(Transient::Busy));
        // All-digit SQLSTATEs are PostgreSQL's, whatever their low byte.
        for sqlstate in ["22021", "23505", "22P05", "42601", "23502"] {
            assert_eq!(classify_code(sqlstate), None, "{sqlstate}");
        }
        // SQLITE_CONSTRAINT_CHECK, unique_violation, check_violation: permanent.
        assert_eq!(classify_code("275"), None);
        assert_eq!(classify_code("23505"), None);
        assert_eq!(classify_code("23514"), None);
        assert_eq!(classify_code("1"), None);
    }

    #[test]
    fn classifies_sqlx_errors() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), Some(Transient::ConnectionLost));
        assert_eq!(
            classify(&sqlx::Error::PoolTimedOut),
            Some(Transient::ConnectionLost)
        );
        assert_eq!(classify(&sqlx::Error::RowNotFound), None);
        assert_eq!(classify(&sqlx::Error::PoolClosed), None);
        assert!(!DbError::BuildNotFound(BuildId(1)).is_retryable());
    }
}
