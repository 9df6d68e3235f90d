//! Inline byte-string comparison for the hot merges and sorts keyed by UUID or instance ID.
//!
//! `str::cmp` calls the C library's `memcmp`, whose call overhead dominates for the short
//! strings the core compares millions of times per simulated day (27-byte Arvados UUIDs that
//! share their first 16 bytes). [`str_cmp`] compares eight bytes at a time as big-endian
//! integers, inline. Invariant: it returns exactly what `a.cmp(b)` returns, for every pair of
//! strings, so it can replace `Ord` wherever an order must match a `BTreeMap<String, _>`'s.

use std::cmp::Ordering;

/// Lexicographic byte order of `a` and `b`: the same answer as `a.cmp(b)`.
#[inline]
pub fn str_cmp(a: &str, b: &str) -> Ordering {
    bytes_cmp(a.as_bytes(), b.as_bytes())
}

/// Whether `a == b`, compared as [`str_cmp`] does.
#[inline]
pub fn str_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && str_cmp(a, b) == Ordering::Equal
}

/// Lexicographic order of two byte strings: the same answer as `a.cmp(b)`.
#[inline]
pub fn bytes_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().min(b.len());
    let (mut ca, mut cb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        let x = u64::from_be_bytes(x.try_into().unwrap_or([0; 8]));
        let y = u64::from_be_bytes(y.try_into().unwrap_or([0; 8]));
        if x != y {
            return x.cmp(&y);
        }
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_str_cmp() {
        let words = [
            "",
            "a",
            "a\0",
            "ab",
            "b",
            "zzzzz-dz642-000000000010255",
            "zzzzz-dz642-000000000010256",
            "zzzzz-dz642-00000000001025",
            "zzzzz-dz642-100000000010255",
            "zzzzz-dz642-0000000000102550",
            "i-0123456789abcdef",
            "i-0123456789abcdeg",
            "\u{e9}t\u{e9}",
            "\u{ff}",
        ];
        for a in words {
            for b in words {
                assert_eq!(str_cmp(a, b), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(str_eq(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn matches_str_cmp_on_random_strings() {
        let mut rng = crate::core::rng::Rng::new(7);
        for _ in 0..20_000 {
            let mk = |rng: &mut crate::core::rng::Rng| -> Vec<u8> {
                let len = (rng.next_u64() % 40) as usize;
                (0..len)
                    .map(|_| b"ab\0z"[(rng.next_u64() % 4) as usize])
                    .collect()
            };
            let (a, b) = (mk(&mut rng), mk(&mut rng));
            assert_eq!(bytes_cmp(&a, &b), a.cmp(&b), "{a:?} vs {b:?}");
        }
    }
}
