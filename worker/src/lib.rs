//! worker: will register with a coordinator, pull trial leases, run them with lvm-core,
//! stream per-epoch metrics, checkpoint, and report results; `worker run` will run one trial
//! locally. It has no content yet.
