//! worker: trains trials with lvm-core. `worker --coordinator URL` pulls trials from a
//! coordinator and reports their epochs and outcomes ([`remote`]); `worker run` trains one
//! trial given on the command line and prints its metrics ([`local`]).

pub mod local;
pub mod remote;
pub mod spool;
