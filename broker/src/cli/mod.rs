//! The `keelmq` command-line tool's subcommands.

pub mod admin;
