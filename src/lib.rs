//! aml-egress: an egress proxy that lets an Azure Machine Learning workspace reach exactly
//! the hosts it needs.
//!
//! Data flows one way: [`config`] reads settings, [`catalog`] renders the Azure ML host
//! catalog for a cloud, region and feature set into rules, and [`policy`] compiles those
//! rules into tables that answer each destination on the hot path.

#![forbid(unsafe_code)]

pub mod admin;
pub mod allowed;
pub mod catalog;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod export;
pub mod fleet;
pub mod inspect;
pub mod logs;
pub mod metrics;
pub mod nva;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod suggest;
pub mod systemd;
