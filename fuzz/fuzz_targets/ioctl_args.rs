#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luo_fuzz::run_checked(data, luo_fuzz_targets::ioctl::run);
});
