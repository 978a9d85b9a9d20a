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
        Command::Forget(a) => commands::forget::run(a),
        Command::Completions(a) => commands::generate::completions(a),
        Command::Manpage => commands::generate::manpage(),
    };
    let code = match result {
        Ok(code) => code,
        Err(syncer::error::Error::Closed) => syncer::error::ExitCode::Ok,
        Err(e) => {
            syncer::term::err(format_args!("{e}"));
            e.exit_code()
        }
    };
    std::process::ExitCode::from(code as u8)
}
