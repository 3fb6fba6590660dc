//! The `clonebd` command line: a thin `main` over one module per subcommand.

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clonebd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
