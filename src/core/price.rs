//! Instance price histories (reference-workers.md §6.1 `NormalizePriceHistory`, §2.3 and the
//! EC2 `PriceHistory(type)` paragraph of §6.2).
//!
//! A driver that knows the market price of its instances (EC2 spot instances) puts a
//! normalised history into [`InstanceInfo::price_history`]. The run probe then becomes
//! `<runner> --list --stdin-prices` with the history, plus the added scratch volume's hourly
//! cost, as a JSON array on stdin: [`probe_prices`] and [`prices_json`].
//!
//! The JSON is what Go's `json.Marshal([]cloud.InstancePrice)` writes: `StartTime` in RFC 3339
//! (UTC, fractional seconds without trailing zeros) and `Price` as Go formats a float64.

use super::time::Timestamp;
use super::types::{InstanceInfo, InstanceType, PricePoint};

/// Bytes per GiB.
const GIB: i64 = 1 << 30;

/// Go's `cloud.NormalizePriceHistory`: sorts newest first, then drops every element that has
/// the same start time **or** the same price as the next older one (so of a run of equal
/// prices, the oldest is kept). Sorting is stable, so equal start times keep their input order.
pub fn normalize_price_history(mut prices: Vec<PricePoint>) -> Vec<PricePoint> {
    prices.sort_by_key(|p| std::cmp::Reverse(p.start_time));
    // Go removes element i when it matches element i + 1 and then looks at the same position
    // again; the element after i has not been looked at yet, so each element is compared with
    // its neighbour in the sorted input.
    let keep: Vec<bool> = (0..prices.len())
        .map(|i| {
            prices.get(i + 1).is_none_or(|older| {
                older.start_time != prices[i].start_time && older.price != prices[i].price
            })
        })
        .collect();
    let mut k = keep.into_iter();
    prices.retain(|_| k.next().unwrap_or(true));
    prices
}

/// The prices the run probe sends for `info` running as `itype`: the history with the added
/// scratch volume's hourly cost, `scratch_gib_month_price` × ceil(AddedScratch / GiB) / 30 /
/// 24, added to each price (the arithmetic of Go's EC2 `PriceHistory`). Empty when the
/// instance has no history.
pub fn probe_prices(info: &InstanceInfo, itype: &InstanceType) -> Vec<PricePoint> {
    if info.price_history.is_empty() {
        return Vec::new();
    }
    let gib = itype.added_scratch.max(0).saturating_add(GIB - 1) / GIB;
    let hourly = info.scratch_gib_month_price * gib as f64 / 30.0 / 24.0;
    info.price_history
        .iter()
        .map(|p| PricePoint {
            start_time: p.start_time,
            price: p.price + hourly,
        })
        .collect()
}

/// `prices` as Go's `json.Marshal` writes a `[]cloud.InstancePrice`:
/// `[{"StartTime":"2026-01-02T03:04:05Z","Price":0.0441},…]`. A price that is not finite
/// (which Go cannot encode) is left out.
pub fn prices_json(prices: &[PricePoint]) -> String {
    let mut out = String::from("[");
    for p in prices.iter().filter(|p| p.price.is_finite()) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str("{\"StartTime\":\"");
        out.push_str(&rfc3339(p.start_time));
        out.push_str("\",\"Price\":");
        out.push_str(&go_json_float(p.price));
        out.push('}');
    }
    out.push(']');
    out
}

/// `t` (milliseconds since the Unix epoch) as Go's `time.Time.MarshalJSON` writes a UTC time:
/// `2006-01-02T15:04:05Z`, or with `.5`, `.25`, `.125` … for a fraction (trailing zeros
/// dropped).
pub fn rfc3339(t: Timestamp) -> String {
    let ms = t.as_millis();
    let secs = ms / 1000;
    let frac = ms % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if frac > 0 {
        let f = format!("{frac:03}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `f` as Go's `encoding/json` writes a float64: the shortest representation, in plain
/// notation for 1e-6 ≤ |f| < 1e21 (and 0), otherwise in exponent form (`1e-7`, `1e+21`).
pub fn go_json_float(f: f64) -> String {
    let abs = f.abs();
    if abs == 0.0 || (1e-6..1e21).contains(&abs) {
        // Rust's Display is the shortest round-tripping form, never in exponent notation.
        return format!("{f}");
    }
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(minutes: u64, price: f64) -> PricePoint {
        PricePoint {
            start_time: Timestamp(minutes * 60_000),
            price,
        }
    }

    #[test]
    fn normalize_matches_the_reference_test() {
        let input = vec![
            p(1, 1.0),
            p(4, 1.2),
            p(5, 1.1),
            p(3, 1.2),
            p(5, 1.1),
            p(2, 1.0),
        ];
        assert_eq!(
            normalize_price_history(input),
            [p(5, 1.1), p(3, 1.2), p(1, 1.0)]
        );
    }

    #[test]
    fn normalize_compares_with_the_sorted_neighbour() {
        assert_eq!(normalize_price_history(Vec::new()), []);
        assert_eq!(normalize_price_history(vec![p(7, 0.5)]), [p(7, 0.5)]);
        // Same start time, different prices: the newer one in the sorted (stable) order goes.
        assert_eq!(
            normalize_price_history(vec![p(2, 0.3), p(2, 0.4), p(1, 0.1)]),
            [p(2, 0.4), p(1, 0.1)]
        );
        // Each element is compared with its sorted neighbour, even one that is dropped itself:
        // 3:5.0 goes for 3:1.0's start time, and 3:1.0 for 1:1.0's price.
        assert_eq!(
            normalize_price_history(vec![p(3, 5.0), p(3, 1.0), p(1, 1.0)]),
            [p(1, 1.0)]
        );
        // Alternating prices are all kept.
        assert_eq!(
            normalize_price_history(vec![p(1, 1.0), p(2, 2.0), p(3, 1.0)]),
            [p(3, 1.0), p(2, 2.0), p(1, 1.0)]
        );
    }

    #[test]
    fn probe_prices_add_the_scratch_volume() {
        let mut info = InstanceInfo {
            price_history: vec![p(2, 0.05), p(1, 0.04)],
            scratch_gib_month_price: 0.1,
            ..InstanceInfo::default()
        };
        let mut t = InstanceType {
            added_scratch: 0,
            ..InstanceType::default()
        };
        assert_eq!(probe_prices(&info, &t), info.price_history);
        // 50 GiB + 1 byte → 51 GiB at $0.10 per GiB-month.
        t.added_scratch = (50 << 30) + 1;
        let hourly = 0.1 * 51.0 / 30.0 / 24.0;
        assert_eq!(
            probe_prices(&info, &t),
            [p(2, 0.05 + hourly), p(1, 0.04 + hourly)]
        );
        info.price_history.clear();
        assert_eq!(probe_prices(&info, &t), []);
    }

    #[test]
    fn json_is_what_go_marshals() {
        assert_eq!(prices_json(&[]), "[]");
        let prices = [
            PricePoint {
                start_time: Timestamp(1_767_323_045_000),
                price: 0.0441,
            },
            PricePoint {
                start_time: Timestamp(951_782_400_500),
                price: 1.0,
            },
            PricePoint {
                start_time: Timestamp(0),
                price: f64::NAN,
            },
        ];
        assert_eq!(
            prices_json(&prices),
            "[{\"StartTime\":\"2026-01-02T03:04:05Z\",\"Price\":0.0441},\
             {\"StartTime\":\"2000-02-29T00:00:00.5Z\",\"Price\":1}]"
        );
    }

    #[test]
    fn rfc3339_and_floats() {
        assert_eq!(rfc3339(Timestamp(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Timestamp(1_480_560_256_120)),
            "2016-12-01T02:44:16.12Z"
        );
        assert_eq!(
            rfc3339(Timestamp(4_102_444_799_999)),
            "2099-12-31T23:59:59.999Z"
        );
        assert_eq!(go_json_float(0.0), "0");
        assert_eq!(go_json_float(0.1), "0.1");
        assert_eq!(go_json_float(12.0), "12");
        assert_eq!(go_json_float(0.000001), "0.000001");
        assert_eq!(go_json_float(1e-7), "1e-7");
        assert_eq!(go_json_float(2.5e21), "2.5e+21");
        assert_eq!(go_json_float(-0.25), "-0.25");
    }
}
