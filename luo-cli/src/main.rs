//! `luo`: see the library documentation (`luo help`).

fn main() {
    // First thing: the new image of `luo demo` measures exec up to here.
    let t_start = backend_user::sys::monotonic_ns();
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "luo".into());
    let code = luo_cli::run(argv0, args.collect(), t_start);
    std::process::exit(code);
}
