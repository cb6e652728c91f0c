//! `wedge-autopsy serve`: alerts trigger the autopsy, results reach the ticket.

pub mod alert;
pub mod auth;
pub mod config;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod restart;
pub mod watch;
pub mod runner;
