//! `cargo xtask`: workspace tasks.
//!
//! `cargo xtask vm test` builds Linux 7.3 (Debian's linux-source package, the project's
//! patch series, a tinyconfig-based config with Rust), boots it under QEMU TCG and runs
//! the upstream LUO selftests, printing a TAP report. See docs/kernel.md and
//! backend-linux/kernel/README.md.

mod dfuzz;
mod guest;
mod host;
mod kbuild;
mod paths;
mod qemu;
mod source;
mod suite;
mod sysroot;
mod util;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use kbuild::Core;
use util::{bail, Result};

const USAGE: &str = "\
usage: cargo xtask vm test  [--core c|rust] [--tests NAME[,NAME...]] [--skip NAME[,NAME...]]
                            [--clean]
                            [--no-debug] [--timeout SECS] [--jobs N] [--verbose]
                            [--kexec-into c|rust] [--sanitize]
       cargo xtask vm build [--core c|rust] [--clean] [--no-debug] [--jobs N] [--sanitize]
       cargo xtask vm list
       cargo xtask vm clean
       cargo xtask vm fuzz  --seeds A..B [--core c|rust|both] [--ops N] [--kexec-every K]
                            [--vms N] [--smp N] [--timeout SECS] [--no-debug] [--jobs N]
                            [--sanitize]

vm test    install what is missing, build the kernel and the selftests, boot one VM per
           test and print a TAP report on stdout (progress goes to stderr). Exit status
           0 = all passed, 1 = a test failed, 2 = the pipeline itself failed.
vm build   everything up to the kernel and the guest programs, no VM.
vm list    the test names accepted by --tests (VM tests, and harness cases as VM.CASE).
vm clean   remove the kernel build outputs (keeps toolchain, source and logs).
vm fuzz    differential fuzzing of /dev/liveupdate (docs/verification.md): seeds A..B (B
           excluded) become operation sequences, run on both cores (--vms VMs per core,
           default 1, many sequences per boot); the traces must agree except where
           docs/decisions.md fixes an upstream bug. --ops: operations per sequence
           (default 60); --kexec-every K: seeds with seed % K == K-1 kexec half way
           (default 0); --smp N: vCPUs per VM (default 1); --sanitize: the Rust core's
           kernel is the --sanitize build, its last boot scans kmemleak.
           LUO_DFUZZ_BZIMAGE_C / _RUST: use these bzImages (inside intact
           build directories) instead of building. Exit status 1 on a finding, a splat
           or a VM that did not finish.

--core       LUO core to build: c (upstream, default) or rust (needs the patch series)
--tests      run only these (repeatable or comma separated), e.g. liveupdate.preserve_memfd
--skip       leave these VM tests out (repeatable or comma separated)
--clean      remove the build outputs first (a cold kernel build)
--no-debug   leave out backend-linux/kernel/config/debug.config (lockdep etc.), which
             roughly doubles boot and kexec times under TCG; for timing runs
--timeout    per-VM timeout in seconds (default 120)
--jobs       make -j for the kernel (default: number of CPUs)
--verbose    copy every VM's serial output to stderr as it arrives
--sanitize   a clang-built kernel with KASAN (generic, inline), UBSAN and kmemleak on top of
             debug.config (config/kasan.config + config/sanitize.config; the same as
             LUO_LLVM=-19 LUO_EXTRA_CONFIG=kasan,sanitize); kmemleak is scanned at the end of
             each boot and any report fails the test. Slow under TCG: the per-VM timeout
             is at least 600 s
--kexec-into the core the systemd_luo VM kexecs into (default: the --core under test):
             `--core c --kexec-into rust` hands systemd's fd stores from the C core to
             the Rust core; both kernels are built

Cache: $LUO_CACHE (default /var/cache/luo).";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            // "Bail out!" keeps a TAP consumer from mistaking a broken pipeline for a
            // run with zero failures.
            println!("Bail out! {}", e.to_string().lines().next().unwrap_or(""));
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_vm_options(args: &[String]) -> Result<vm::Options> {
    let mut opts = vm::Options {
        core: Core::C,
        tests: Vec::new(),
        skip: Vec::new(),
        clean: false,
        debug: true,
        timeout: Duration::from_secs(120),
        verbose: false,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        kexec_into: None,
        sanitize: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value\n\n{USAGE}"),
            }
        };
        match flag {
            "--core" => {
                let v = value("--core")?;
                let Some(c) = Core::parse(&v) else {
                    bail!("--core must be `c` or `rust`, not `{v}`");
                };
                opts.core = c;
            }
            "--tests" | "--test" => {
                opts.tests.extend(util::comma_list(&value("--tests")?));
            }
            "--skip" => {
                opts.skip.extend(util::comma_list(&value("--skip")?));
            }
            "--kexec-into" => {
                let v = value("--kexec-into")?;
                let Some(c) = Core::parse(&v) else {
                    bail!("--kexec-into must be `c` or `rust`, not `{v}`");
                };
                opts.kexec_into = Some(c);
            }
            "--sanitize" => opts.sanitize = true,
            "--clean" => opts.clean = true,
            "--no-debug" => opts.debug = false,
            "--verbose" | "-v" => opts.verbose = true,
            "--timeout" => {
                let v = value("--timeout")?;
                match v.parse::<u64>() {
                    Ok(s) if s > 0 => opts.timeout = Duration::from_secs(s),
                    _ => bail!("--timeout must be a positive number of seconds, not `{v}`"),
                }
            }
            "--jobs" | "-j" => {
                let v = value("--jobs")?;
                match v.parse::<usize>() {
                    Ok(n) if n > 0 => opts.jobs = n,
                    _ => bail!("--jobs must be a positive number, not `{v}`"),
                }
            }
            _ => bail!("unknown option `{a}`\n\n{USAGE}"),
        }
    }
    if opts.sanitize {
        opts.timeout = opts.timeout.max(Duration::from_secs(600));
    }
    Ok(opts)
}

fn run() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths = paths::Paths::new()?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["vm", "test", rest @ ..] | ["vm", "run", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let opts = parse_vm_options(&rest)?;
            let _env = opts.sanitize.then(vm::SanitizeEnv::set);
            let ok = vm::test(&paths, &opts)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ["vm", "build", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let opts = parse_vm_options(&rest)?;
            let _env = opts.sanitize.then(vm::SanitizeEnv::set);
            vm::build(&paths, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        ["vm", "fuzz", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let opts =
                dfuzz::parse(&rest).map_err(|e| util::Error::msg(format!("{e}\n\n{USAGE}")))?;
            Ok(if dfuzz::run(&paths, &opts)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ["vm", "list"] => {
            vm::list(&paths);
            Ok(ExitCode::SUCCESS)
        }
        ["vm", "clean"] => {
            let _lock = util::CacheLock::acquire(&paths.cache)?;
            vm::clean(&paths)?;
            Ok(ExitCode::SUCCESS)
        }
        [] | ["help"] | ["-h"] | ["--help"] | ["vm"] | ["vm", "help" | "-h" | "--help"] => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("unknown command `{}`\n\n{USAGE}", args.join(" ")),
    }
}
