//! Durations and byte sizes as the Arvados config spells them, and their human rendering.
//!
//! Durations follow Go's `time.ParseDuration` exactly (`1h30m`, `1.5h`, `500ms`, `10us`, `-2s`,
//! `0`), plus the Arvados rule that a unitless `0` is zero. Byte sizes follow Arvados `ByteSize`:
//! a number optionally followed by one of `K M G T P E` (powers of 1000) or `Ki Mi Gi Ti Pi Ei`
//! (powers of 1024), each optionally followed by `B`, with optional spaces before the unit. Units
//! are case-sensitive, as in Arvados. Fractions are allowed and truncated to whole bytes.
//!
//! Invariant: every parse either returns a value that fits in an `i64` or an error; nothing here
//! wraps or saturates silently.

use std::fmt;

/// Nanoseconds per unit, as in Go's `time` package.
const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// Why a duration or byte size did not parse. The caller adds the key path and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitError {
    /// The text is not a duration at all (wrong shape, empty).
    BadDuration,
    /// A duration component has no unit (`10`).
    MissingUnit,
    /// A duration unit that Go does not know (`1x`, `1d`).
    UnknownDurationUnit(String),
    /// The value does not fit in 64 bits.
    Overflow,
    /// The text has no number in it, or a malformed one.
    BadNumber,
    /// A byte-size unit that Arvados does not know (`GiBs`, `gb`).
    UnknownSizeUnit(String),
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitError::BadDuration => f.write_str("expected something like 30s, 10m or 1h30m"),
            UnitError::MissingUnit => f.write_str("missing unit (use ns, us, ms, s, m or h)"),
            UnitError::UnknownDurationUnit(u) => {
                write!(f, "unknown unit {u:?} (use ns, us, ms, s, m or h)")
            }
            UnitError::Overflow => f.write_str("out of range"),
            UnitError::BadNumber => f.write_str("malformed number"),
            UnitError::UnknownSizeUnit(u) => write!(
                f,
                "unknown unit {u:?} (use B, K, KB, KiB, M, MB, MiB, G, GB, GiB, T, TB, TiB, P, PB, PiB, E, EB or EiB)"
            ),
        }
    }
}

impl std::error::Error for UnitError {}

/// Parses a Go duration string into signed nanoseconds, exactly as `time.ParseDuration` does.
///
/// The grammar is `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or the bare string `0`. Units are `ns`,
/// `us`, `µs` (either micro sign), `ms`, `s`, `m` and `h`.
pub fn parse_duration(text: &str) -> Result<i64, UnitError> {
    let mut s = text;
    let mut neg = false;
    if let Some(c) = s.chars().next()
        && (c == '-' || c == '+')
    {
        neg = c == '-';
        s = &s[1..];
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(UnitError::BadDuration);
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        let first = s.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(UnitError::BadDuration);
        }
        // The integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let mut v: u64 = 0;
        for b in s[..int_len].bytes() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .filter(|v| *v <= 1 << 63)
                .ok_or(UnitError::Overflow)?;
        }
        let pre = int_len > 0;
        s = &s[int_len..];
        // The fraction: digits past what fits are dropped, as Go does.
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if let Some(rest) = s.strip_prefix('.') {
            s = rest;
            let frac_len = s.bytes().take_while(u8::is_ascii_digit).count();
            post = frac_len > 0;
            let mut overflow = false;
            for b in s[..frac_len].bytes() {
                if overflow {
                    continue;
                }
                if frac > (i64::MAX as u64) / 10 {
                    overflow = true;
                    continue;
                }
                let y = frac * 10 + u64::from(b - b'0');
                if y > 1 << 63 {
                    overflow = true;
                    continue;
                }
                frac = y;
                scale *= 10.0;
            }
            s = &s[frac_len..];
        }
        if !pre && !post {
            // A lone "." is not a number.
            return Err(UnitError::BadDuration);
        }
        // The unit runs to the next digit or dot.
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_len == 0 {
            return Err(UnitError::MissingUnit);
        }
        let unit_text = &s[..unit_len];
        s = &s[unit_len..];
        let unit = match unit_text {
            "ns" => NANOSECOND,
            "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
            "ms" => MILLISECOND,
            "s" => SECOND,
            "m" => MINUTE,
            "h" => HOUR,
            other => return Err(UnitError::UnknownDurationUnit(other.to_string())),
        };
        if v > (1 << 63) / unit {
            return Err(UnitError::Overflow);
        }
        v *= unit;
        if frac > 0 {
            // The float arithmetic matches Go's, including its rounding.
            v = v
                .checked_add((frac as f64 * (unit as f64 / scale)) as u64)
                .ok_or(UnitError::Overflow)?;
            if v > 1 << 63 {
                return Err(UnitError::Overflow);
            }
        }
        total = total
            .checked_add(v)
            .filter(|t| *t <= 1 << 63)
            .ok_or(UnitError::Overflow)?;
    }
    if neg {
        // -(1<<63) is representable.
        return Ok((total as i128).wrapping_neg() as i64);
    }
    i64::try_from(total).map_err(|_| UnitError::Overflow)
}

/// The value of each byte-size prefix (after one trailing `B` is removed).
fn size_prefix(prefix: &str) -> Option<i64> {
    Some(match prefix {
        "" => 1,
        "K" => 1_000,
        "Ki" => 1 << 10,
        "M" => 1_000_000,
        "Mi" => 1 << 20,
        "G" => 1_000_000_000,
        "Gi" => 1 << 30,
        "T" => 1_000_000_000_000,
        "Ti" => 1 << 40,
        "P" => 1_000_000_000_000_000,
        "Pi" => 1 << 50,
        "E" => 1_000_000_000_000_000_000,
        "Ei" => 1 << 60,
        _ => return None,
    })
}

/// Whether `s` is a JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), which is what
/// Arvados accepts before the unit.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(c) if c.is_ascii_digit() => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == b.len()
}

/// Parses an Arvados byte size given as a string: `64GiB`, `128GB`, `1.5 GiB`, `500MiB`, `1e9`,
/// `1000`.
pub fn parse_byte_size(text: &str) -> Result<i64, UnitError> {
    let s = text.trim_start();
    // The number ends at the last character that can belong to a JSON number.
    let mut split =
        match s.rfind(|c: char| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E')) {
            Some(i) => i + 1,
            None => return Err(UnitError::BadNumber),
        };
    if s.as_bytes()[split - 1] == b'E' {
        // An E that ends the number is the Exa prefix ("4.5EiB"), not an exponent.
        split -= 1;
    }
    // Go's JSON decoder skips whitespace after the number ("5 EiB").
    let number = s[..split].trim_end();
    if !is_json_number(number) {
        return Err(UnitError::BadNumber);
    }
    let unit = s[split..].trim_matches(' ');
    let prefix = unit.strip_suffix('B').unwrap_or(unit);
    let scale = size_prefix(prefix).ok_or_else(|| UnitError::UnknownSizeUnit(unit.to_string()))?;
    if let Ok(int) = number.parse::<i64>() {
        return int.checked_mul(scale).ok_or(UnitError::Overflow);
    }
    let float: f64 = number.parse().map_err(|_| UnitError::BadNumber)?;
    bytes_from_f64(float * scale as f64)
}

/// Truncates a byte count given as a float (a YAML number like `1e9`, or a fractional size).
pub fn bytes_from_f64(value: f64) -> Result<i64, UnitError> {
    // 2^63 is the first float past i64::MAX; -2^63 is i64::MIN. NaN is in no range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if !(-LIMIT..LIMIT).contains(&value) {
        return Err(UnitError::Overflow);
    }
    Ok(value.trunc() as i64)
}

/// Renders a byte count with the largest binary unit that keeps it at least 1: `64 GiB`,
/// `119.2 GiB`, `512 B`. Exact multiples have no decimals.
pub fn format_bytes(bytes: i64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let magnitude = bytes.unsigned_abs();
    let mut exp = 0usize;
    while exp + 1 < UNITS.len() && magnitude >= 1u64 << (10 * (exp + 1)) {
        exp += 1;
    }
    let unit_size = 1u64 << (10 * exp);
    if magnitude.is_multiple_of(unit_size) {
        let sign = if bytes < 0 { "-" } else { "" };
        format!("{sign}{} {}", magnitude / unit_size, UNITS[exp])
    } else {
        format!("{:.1} {}", bytes as f64 / unit_size as f64, UNITS[exp])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn durations_parse_like_go() {
        let table: &[(&str, i64)] = &[
            ("0", 0),
            ("+0", 0),
            ("-0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0s", 0),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600_000_000),
            ("5.s", 5 * S),
            (".5s", S / 2),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4_000_000),
            ("1.0040s", S + 4_000_000),
            ("100.00100s", 100 * S + 1_000_000),
            ("10ns", 10),
            ("11us", 11_000),
            ("12\u{b5}s", 12_000),
            ("12\u{3bc}s", 12_000),
            ("13ms", 13_000_000),
            ("500ms", S / 2),
            ("14s", 14 * S),
            ("15m", 15 * 60 * S),
            ("1m", 60 * S),
            ("10s", 10 * S),
            ("16h", 16 * 3600 * S),
            ("1h30m", 5400 * S),
            ("1.5h", 5400 * S),
            ("3h30m", 3 * 3600 * S + 30 * 60 * S),
            ("10.5s4m", 4 * 60 * S + 10 * S + S / 2),
            ("-2m3.4s", -(2 * 60 * S + 3 * S + 400_000_000)),
            (
                "1h2m3s4ms5us6ns",
                3600 * S + 2 * 60 * S + 3 * S + 4_000_000 + 5_000 + 6,
            ),
            (
                "39h9m14.425s",
                39 * 3600 * S + 9 * 60 * S + 14 * S + 425_000_000,
            ),
            ("52763797000ns", 52_763_797_000),
            ("0.3333333333333333333h", 20 * 60 * S),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("0.100000000000000000000h", 6 * 60 * S),
            (
                "0.830103483285477580700h",
                49 * 60 * S + 48 * S + 372_539_827,
            ),
        ];
        for (text, want) in table {
            assert_eq!(parse_duration(text), Ok(*want), "parse_duration({text:?})");
        }
    }

    #[test]
    fn bad_durations_are_rejected() {
        let table: &[(&str, UnitError)] = &[
            ("", UnitError::BadDuration),
            ("3", UnitError::MissingUnit),
            ("60", UnitError::MissingUnit),
            ("-", UnitError::BadDuration),
            ("s", UnitError::BadDuration),
            (".", UnitError::BadDuration),
            ("-.", UnitError::BadDuration),
            (".s", UnitError::BadDuration),
            ("+.s", UnitError::BadDuration),
            ("1x", UnitError::UnknownDurationUnit("x".into())),
            ("1d", UnitError::UnknownDurationUnit("d".into())),
            ("1S", UnitError::UnknownDurationUnit("S".into())),
            ("1 s", UnitError::UnknownDurationUnit(" s".into())),
            (" 1s", UnitError::BadDuration),
            ("1h30", UnitError::MissingUnit),
            ("9223372036854775808ns", UnitError::Overflow),
            ("9223372036854775.808us", UnitError::Overflow),
            ("9223372036854ms775us808ns", UnitError::Overflow),
            ("-9223372036854775809ns", UnitError::Overflow),
            ("3000000h", UnitError::Overflow),
        ];
        for (text, want) in table {
            assert_eq!(
                parse_duration(text).as_ref(),
                Err(want),
                "parse_duration({text:?})"
            );
        }
    }

    #[test]
    fn byte_sizes_parse_like_arvados() {
        const KI: i64 = 1 << 10;
        const MI: i64 = 1 << 20;
        const GI: i64 = 1 << 30;
        let table: &[(&str, i64)] = &[
            ("0", 0),
            ("1", 1),
            ("1000", 1000),
            ("1B", 1),
            ("1 B", 1),
            ("1K", 1000),
            ("1KB", 1000),
            ("1Ki", KI),
            ("1KiB", KI),
            ("500MiB", 500 * MI),
            ("550MiB", 550 * MI),
            ("12345M", 12_345_000_000),
            ("128MB", 128_000_000),
            ("64GiB", 64 * GI),
            ("64 GiB", 64 * GI),
            ("64GB", 64_000_000_000),
            ("128GB", 128_000_000_000),
            ("16GB", 16_000_000_000),
            ("1.5GiB", 3 * GI / 2),
            ("1.5 GiB", 3 * GI / 2),
            ("0.5KiB", 512),
            ("1.0001K", 1000),
            ("2T", 2_000_000_000_000),
            ("2TiB", 2 << 40),
            ("3P", 3_000_000_000_000_000),
            ("3PiB", 3 << 50),
            ("4E", 4_000_000_000_000_000_000),
            ("4EB", 4_000_000_000_000_000_000),
            ("4EiB", 4 << 60),
            ("4.5EiB", 9 << 59),
            ("5 EiB", 5 << 60),
            ("1e9", 1_000_000_000),
            ("1E9", 1_000_000_000),
            ("2e3K", 2_000_000),
            ("1.5e3", 1500),
            ("-1", -1),
            ("-1KiB", -KI),
            (" 12M ", 12_000_000),
            ("9223372036854775807", i64::MAX),
        ];
        for (text, want) in table {
            assert_eq!(
                parse_byte_size(text),
                Ok(*want),
                "parse_byte_size({text:?})"
            );
        }
    }

    #[test]
    fn bad_byte_sizes_are_rejected() {
        let table: &[(&str, UnitError)] = &[
            ("", UnitError::BadNumber),
            ("GiB", UnitError::BadNumber),
            ("abc", UnitError::BadNumber),
            ("64GiBs", UnitError::UnknownSizeUnit("GiBs".into())),
            ("64gb", UnitError::UnknownSizeUnit("gb".into())),
            ("64k", UnitError::UnknownSizeUnit("k".into())),
            ("64kB", UnitError::UnknownSizeUnit("kB".into())),
            ("64Gib", UnitError::UnknownSizeUnit("Gib".into())),
            ("64BB", UnitError::UnknownSizeUnit("BB".into())),
            ("64iB", UnitError::UnknownSizeUnit("iB".into())),
            ("64X", UnitError::UnknownSizeUnit("X".into())),
            ("1.2.3", UnitError::BadNumber),
            ("01", UnitError::BadNumber),
            (".5G", UnitError::BadNumber),
            ("5.G", UnitError::BadNumber),
            ("1e", UnitError::BadNumber),
            ("+5", UnitError::BadNumber),
            ("10EB", UnitError::Overflow),
            ("9223372036854775808", UnitError::Overflow),
            ("9EiB", UnitError::Overflow),
            ("1e30", UnitError::Overflow),
        ];
        for (text, want) in table {
            assert_eq!(
                parse_byte_size(text).as_ref(),
                Err(want),
                "parse_byte_size({text:?})"
            );
        }
    }

    #[test]
    fn bytes_render_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1 << 10), "1 KiB");
        assert_eq!(format_bytes(64 << 30), "64 GiB");
        assert_eq!(format_bytes(128_000_000_000), "119.2 GiB");
        assert_eq!(format_bytes(64_000_000_000), "59.6 GiB");
        assert_eq!(format_bytes(3 << 39), "1.5 TiB");
    }
}
