//! Forwarding plain HTTP: absolute-form requests, requests inside a tunnel and redirected
//! ones, each decided on host, port and path (`http`, with the host a request names read by
//! `host`) and sent through the pooled upstream client over the guarded dialler
//! (`super::pool`).

pub mod host;
pub(crate) mod http;
mod upgrade;
