//! The `keelmq` command-line tool's subcommands.

pub mod admin;
pub mod bench;
pub mod dev;
mod unary;
