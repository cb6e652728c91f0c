//! `wedge-autopsy serve`: alerts trigger the autopsy, results reach the ticket.

pub mod alert;
pub mod auth;
pub mod config;
