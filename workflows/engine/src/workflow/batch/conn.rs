//! The connection a batching task runs its statements on: its own, outside the pool.
use sqlx::PgPool;

/// The connection a batching task (the group committer, the locked batches) runs its statements on: its own,
/// outside the pool, with sequential scans priced out of its plans (`enable_seqscan = off`).
///
/// Why: a connection keeps a prepared statement's generic plan, made from the statistics of
/// the moment. Planned while a table was small (a fresh database, the minute before
/// autovacuum first analyzes it), a batch statement's lookups by `id = ANY(array)` became
/// sequential scans, and stayed so while the table grew: measured at ~2.5× the Postgres time
/// per workflow, depending on which pooled connection happened to plan first. Every lookup
/// of these statements has an index, so the setting only removes the bad choice; on a pooled
/// connection it would leak to every other statement.
pub(crate) struct BatchConn {
    pool: PgPool,
    conn: Option<sqlx::PgConnection>,
}

impl BatchConn {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The connection, (re)opened if there is none.
    pub(crate) async fn get(&mut self) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        use sqlx::ConnectOptions;
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let mut conn = self.pool.connect_options().connect().await?;
                crate::workflow::db::batch_session_in(&mut conn).await?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection after an error (it may be broken); the next use opens another.
    pub(crate) fn discard(&mut self) {
        self.conn = None;
    }
}
