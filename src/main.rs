//! Parse, run the command, map the result to an exit code. Errors are printed here, once.

use clap::Parser;

use syncer::cli::{Cli, Command};
use syncer::commands;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Monoshot(a) => commands::monoshot::run(a),
        Command::Start(a) => commands::start::run(a),
        Command::Stop(a) => commands::stop::run(a),
        Command::Status(a) => commands::status::run(a),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("syncer: {e}");
            e.exit_code()
        }
    };
    std::process::ExitCode::from(code as u8)
}
