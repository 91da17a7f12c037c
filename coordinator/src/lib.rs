//! coordinator: will hold the sweep files and their expansion into trials, the SQLite store,
//! the pure scheduler state machine, the gRPC service that workers pull from, and the
//! reports. It has no content yet; the trial description types it needs come from lvm-core.
