//! The `clonebd` command line: a thin `main` over one module per subcommand.

#![forbid(unsafe_code)]

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let argv = match cmd::config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("clonebd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = cmd::Cli::parse_from(argv);
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clonebd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
