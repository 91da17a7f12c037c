//! coordinator: expands sweep files into trials ([`sweep`]), keeps their state in SQLite
//! ([`store`]), schedules them with a pure state machine ([`scheduler`]), serves workers
//! over gRPC ([`service`], [`auth`]), drives a sweep to completion ([`serve`]) and turns
//! results into paper-style tables ([`report`], [`status`]).

pub mod auth;
pub mod report;
pub mod scheduler;
pub mod serve;
pub mod service;
pub mod status;
pub mod store;
pub mod sweep;
