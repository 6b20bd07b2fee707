//! `mla`: the trainer binary — a thin shell over `mla_trainer::cli`. Errors print as one
//! line; bad input exits 2, other failures 1.

use std::process::ExitCode;

fn main() -> ExitCode {
    mla_trainer::logging::init();
    match mla_trainer::cli::run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(mla_trainer::error::exit_code(&e))
        }
    }
}
