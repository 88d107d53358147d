//! Statements on either backend without a macro: a statement is its SQL text and a slice of
//! [`Param`]s, run by an [`Exec`] (a pool, or a connection or transaction of one backend); its
//! rows come back as [`Row`]s, which decode the same on both. The PostgreSQL-only statements
//! that bind arrays (the batched writes, `= any($1)` reads) use sqlx directly.

use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Decode, Encode, Transaction, Type};

use super::error::DbError;

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// A value bound to a statement of either backend.
pub(crate) trait Param: Sync {
    fn bind_sqlite<'q>(&'q self, q: SqliteQuery<'q>) -> SqliteQuery<'q>;
    fn bind_pg<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q>;
}

/// The owned column types both backends encode the same way.
pub(crate) trait Plain:
    Sync + for<'a> Encode<'a, Sqlite> + Type<Sqlite> + for<'a> Encode<'a, Postgres> + Type<Postgres>
{
}

impl Plain for i64 {}
impl Plain for i32 {}
impl Plain for Option<i64> {}
impl Plain for Option<i32> {}
impl Plain for String {}
impl Plain for Option<String> {}

impl<T: Plain> Param for T {
    fn bind_sqlite<'q>(&'q self, q: SqliteQuery<'q>) -> SqliteQuery<'q> {
        q.bind(self)
    }
    fn bind_pg<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(self)
    }
}

impl Param for &str {
    fn bind_sqlite<'q>(&'q self, q: SqliteQuery<'q>) -> SqliteQuery<'q> {
        q.bind(*self)
    }
    fn bind_pg<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(*self)
    }
}

impl Param for Option<&str> {
    fn bind_sqlite<'q>(&'q self, q: SqliteQuery<'q>) -> SqliteQuery<'q> {
        q.bind(*self)
    }
    fn bind_pg<'q>(&'q self, q: PgQuery<'q>) -> PgQuery<'q> {
        q.bind(*self)
    }
}

fn sqlite_query<'q>(sql: &'q str, args: &'q [&'q dyn Param]) -> SqliteQuery<'q> {
    args.iter().fold(sqlx::query(sql), |q, a| a.bind_sqlite(q))
}

fn pg_query<'q>(sql: &'q str, args: &'q [&'q dyn Param]) -> PgQuery<'q> {
    args.iter().fold(sqlx::query(sql), |q, a| a.bind_pg(q))
}

/// Where a statement runs: a pool (each statement its own transaction) or a connection (inside a
/// transaction, or a PostgreSQL lane).
pub(crate) enum Exec<'e> {
    SqlitePool(&'e SqlitePool),
    PgPool(&'e PgPool),
    Sqlite(&'e mut SqliteConnection),
    Pg(&'e mut PgConnection),
}

impl Exec<'_> {
    /// Runs the statement; the number of rows it changed.
    pub(crate) async fn execute(self, sql: &str, args: &[&dyn Param]) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Exec::SqlitePool(p) => sqlite_query(sql, args).execute(p).await?.rows_affected(),
            Exec::PgPool(p) => pg_query(sql, args).execute(p).await?.rows_affected(),
            Exec::Sqlite(c) => sqlite_query(sql, args).execute(c).await?.rows_affected(),
            Exec::Pg(c) => pg_query(sql, args).execute(c).await?.rows_affected(),
        })
    }

    pub(crate) async fn fetch_optional(
        self,
        sql: &str,
        args: &[&dyn Param],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(match self {
            Exec::SqlitePool(p) => sqlite_query(sql, args)
                .fetch_optional(p)
                .await?
                .map(Row::Sqlite),
            Exec::PgPool(p) => pg_query(sql, args).fetch_optional(p).await?.map(Row::Pg),
            Exec::Sqlite(c) => sqlite_query(sql, args)
                .fetch_optional(c)
                .await?
                .map(Row::Sqlite),
            Exec::Pg(c) => pg_query(sql, args).fetch_optional(c).await?.map(Row::Pg),
        })
    }

    pub(crate) async fn fetch_all(
        self,
        sql: &str,
        args: &[&dyn Param],
    ) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match self {
            Exec::SqlitePool(p) => rows(sqlite_query(sql, args).fetch_all(p).await?, Row::Sqlite),
            Exec::PgPool(p) => rows(pg_query(sql, args).fetch_all(p).await?, Row::Pg),
            Exec::Sqlite(c) => rows(sqlite_query(sql, args).fetch_all(c).await?, Row::Sqlite),
            Exec::Pg(c) => rows(pg_query(sql, args).fetch_all(c).await?, Row::Pg),
        })
    }
}

fn rows<R>(v: Vec<R>, f: fn(R) -> Row) -> Vec<Row> {
    v.into_iter().map(f).collect()
}

/// A row of either backend.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

impl Row {
    /// Column `col`, decoded as `T`.
    pub(crate) fn get<T>(&self, col: &str) -> Result<T, DbError>
    where
        T: for<'r> Decode<'r, Sqlite>
            + Type<Sqlite>
            + for<'r> Decode<'r, Postgres>
            + Type<Postgres>,
    {
        use sqlx::Row as _;
        Ok(match self {
            Row::Sqlite(r) => r.try_get(col)?,
            Row::Pg(r) => r.try_get(col)?,
        })
    }

    /// The first column, decoded as `T`.
    pub(crate) fn first<T>(&self) -> Result<T, DbError>
    where
        T: for<'r> Decode<'r, Sqlite>
            + Type<Sqlite>
            + for<'r> Decode<'r, Postgres>
            + Type<Postgres>,
    {
        use sqlx::Row as _;
        Ok(match self {
            Row::Sqlite(r) => r.try_get(0)?,
            Row::Pg(r) => r.try_get(0)?,
        })
    }
}

/// A write transaction of either backend (SQLite's starts with `BEGIN IMMEDIATE`).
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Pg(Transaction<'static, Postgres>),
}

impl Tx {
    /// The transaction's connection, for one statement.
    pub(crate) fn exec(&mut self) -> Exec<'_> {
        match self {
            Tx::Sqlite(t) => Exec::Sqlite(t),
            Tx::Pg(t) => Exec::Pg(t),
        }
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Pg(t) => t.commit().await,
        }
    }
}
