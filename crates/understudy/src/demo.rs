//! `understudy demo`: the README's first command. By default the VM demo
//! (a tiny guest printing a counter moves live between two daemons and
//! back); `understudy demo nbd` is the block filter on its own.

mod nbd;
mod vm;

use anyhow::Result;
use clap::{Args, Subcommand};

/// Arguments of `understudy demo`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    cmd: Option<DemoCmd>,
    #[command(flatten)]
    vm: vm::VmDemoArgs,
}

#[derive(Debug, Clone, Subcommand)]
enum DemoCmd {
    /// Serve a small image, write to it over NBD and show which blocks the
    /// dirty bitmap recorded.
    Nbd(nbd::NbdDemoArgs),
}

/// Run the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    match args.cmd {
        Some(DemoCmd::Nbd(a)) => nbd::run(a),
        None => vm::run(&args.vm),
    }
}
