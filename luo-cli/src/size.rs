//! Human sizes: `4096`, `64K`, `64M`, `1G`, `256MiB`, `2GB`. Suffixes are binary (a `M` is
//! 2^20 bytes, as QEMU's `-m 64M`), case-insensitive, with an optional `i` and `B`.

/// Parses a size in bytes. Errors are one line naming the input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "'{s}' is not a size (expected e.g. 64M, 1G, 256MiB)"
        ));
    }
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large a number"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        other => {
            return Err(format!(
                "'{s}' has an unknown unit '{other}' (use K, M, G or T, optionally with iB)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Formats bytes with a binary unit: `256 MiB`, `1 GiB`, `12.5 KiB`, `100 B`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut v = n;
    while unit + 1 < UNITS.len() && v >= 1024 && v % 1024 == 0 {
        v /= 1024;
        unit += 1;
    }
    if unit > 0 || n < 1024 {
        return format!("{v} {}", UNITS[unit]);
    }
    // Not a whole number of any unit: one decimal.
    let mut f = n as f64;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && f >= 1024.0 {
        f /= 1024.0;
        unit += 1;
    }
    format!("{f:.1} {}", UNITS[unit])
}

/// Formats a duration in nanoseconds with a unit that keeps three or four significant digits.
pub fn format_ns(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.3} s", ns as f64 / 1e9)
    }
}

/// A signed offset in nanoseconds (`+1.2 ms`, `-300.00 ms`).
pub fn format_offset(ns: i128) -> String {
    let sign = if ns < 0 { '-' } else { '+' };
    let abs = u64::try_from(ns.unsigned_abs()).unwrap_or(u64::MAX);
    format!("{sign}{}", format_ns(abs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("8 K"), Ok(8 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_ns(999), "999 ns");
        assert_eq!(format_ns(1_500), "1.5 µs");
        assert_eq!(format_ns(2_500_000), "2.50 ms");
        assert_eq!(format_offset(-1_500), "-1.5 µs");
    }
}
