//! worker: trains trials with lvm-core. `worker run` trains one trial given on the command
//! line and prints its metrics ([`local`]); pulling trials from a coordinator builds on the
//! same trial runner.

pub mod local;
