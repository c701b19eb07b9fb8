//! `luod`: see the crate documentation and `docs/luod.md`.

use std::process::ExitCode;

use luod::logging;
use luod::options::{self, Parsed};

fn main() -> ExitCode {
    logging::ignore_sigpipe();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // An old luod asking whether this binary can take its handover (before anything else).
    if backend_user::next_image::is_probe(&args) {
        return match backend_user::next_image::answer(backend_user::next_image::PROGRAM_LUOD) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let opts = match options::parse(&args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            return match logging::stdout(options::USAGE) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    logging::stderr(&format!("luod: cannot write the usage text: {e}\n"));
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => {
            logging::stderr(&format!("luod: {e}\n{}", options::USAGE));
            return ExitCode::from(2);
        }
    };
    let result = luod::Daemon::start(opts).and_then(|d| d.run());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::stderr(&format!("luod: {e}\n"));
            ExitCode::FAILURE
        }
    }
}
