//! coordinator: sweep files and their expansion into trials ([`sweep`]). The SQLite store,
//! the scheduler, the gRPC service that workers pull from and the reports build on these.

pub mod sweep;
