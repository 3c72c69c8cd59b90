//! coturn's user databases: SQLite, PostgreSQL, MySQL/MariaDB and Redis,
//! with coturn's schemas and connection strings, for the server (which
//! reads users, secrets and realm settings through a cache, see
//! [`crate::server::directory`]) and for `turnadmin` (which writes them).

pub mod conn;
pub mod store;

pub use conn::UserDb;
pub use store::{Snapshot, Store};
