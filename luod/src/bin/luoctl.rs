//! `luoctl`: see `luoctl --help` and `docs/luod.md`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    luod::ctl::main(&args)
}
