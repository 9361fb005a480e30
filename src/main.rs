//! `vduse-blkd`: see `vduse-blkd --help`.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    vduse_blkd::cli::run(vduse_blkd::cli::Cli::parse())
}
