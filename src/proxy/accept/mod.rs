//! Accepting connections: the worker threads and their sockets, the client ACL and the
//! connection limits, and a forward-proxy connection's first request head and router.

pub(super) mod conn;
pub(super) mod listen;
pub mod workers;
