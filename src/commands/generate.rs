//! `syncer completions SHELL` and `syncer manpage`: generated from the clap definitions in
//! `cli`, so they always list the options the binary has.

use clap::CommandFactory;

use crate::cli::{Cli, CompletionShell, CompletionsArgs};
use crate::error::{Error, ExitCode, Result};
use crate::term;

pub fn completions(args: &CompletionsArgs) -> Result<ExitCode> {
    let shell = match args.shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "syncer", &mut script);
    term::out_bytes(&script)?;
    Ok(ExitCode::Ok)
}

pub fn manpage() -> Result<ExitCode> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .map_err(|e| Error::io("render the man page", "-", e))?;
    term::out_bytes(&page)?;
    Ok(ExitCode::Ok)
}
