//! The engine's error type.
use uuid::Uuid;

/// `Result` with the engine's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with. Variants carry the identifiers an
/// operator needs to find the row in question.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed an operation.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),

    /// Applying migrations failed.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The attempt's lease is no longer current: the job was rescued and
    /// claimed again, or finished by someone else. Nothing was written.
    #[error("lease for job {job_id} is stale (token {token}); its writes were rolled back")]
    StaleLease { job_id: Uuid, token: Uuid },

    /// No job has this id.
    #[error("job {0} not found")]
    JobNotFound(Uuid),

    /// An operator action does not apply to the job's current state.
    #[error("job {job_id} is {state}; cannot {action}")]
    InvalidTransition {
        job_id: Uuid,
        state: String,
        action: &'static str,
    },

    /// A unique key conflicted with a row that is gone by the time it is
    /// looked up (pruned in between). At REPEATABLE READ or SERIALIZABLE a
    /// conflict with a row committed after the caller's snapshot is reported
    /// by Postgres as a serialization failure instead (transient: retry).
    #[error("unique key {key:?} is taken by a job this transaction's snapshot cannot see")]
    UniqueKeyNotVisible { key: String },

    /// Job arguments could not be (de)serialized.
    #[error("job {kind}: bad arguments: {source}")]
    Args {
        kind: String,
        #[source]
        source: serde_json::Error,
    },

    /// A value given to the engine is out of range.
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl Error {
    /// True for errors worth retrying on a fresh connection: the server went
    /// away, a deadlock or a serialization failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Db(e) => is_transient_db(e),
            _ => false,
        }
    }
}

pub(crate) fn is_transient_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().as_deref().is_some_and(|code| {
            // serialization_failure, deadlock_detected, admin_shutdown, crash_shutdown,
            // cannot_connect_now, too_many_connections, and every connection exception
            // (class 08) — which is also how PgBouncer reports a server it cannot log in to
            // during a failover ("server_login_retry", 08P01): the database is away, the
            // work is not at fault.
            matches!(
                code,
                "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300"
            ) || code.starts_with("08")
        }),
        _ => false,
    }
}
