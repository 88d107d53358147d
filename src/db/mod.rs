//! The database: Hydra's tables on SQLite and PostgreSQL, typed queries, queue notifications.
