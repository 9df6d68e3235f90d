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

/// The stable order of `v` by `key` (ties keep their positions), as indices into `v`: what
/// `(0..v.len())` sorted stably by `str_cmp(key(v[i]), key(v[j]))` gives.
///
/// Sorting by a key that points into scattered heap strings costs a cache miss or two per
/// comparison. Here each key is read twice in one sequential sweep: once for the prefix all
/// keys share (Arvados UUIDs share their first 12 bytes), once for the next 16 bytes as a
/// big-endian `u128`, zero-padded. The sort then compares those integers; only equal integers
/// (keys that agree on those 16 bytes, or a key that is a prefix of another) read the keys
/// again. A strictly smaller integer implies a strictly smaller key, so the order is exact.
pub fn sorted_positions_by_str<T>(v: &[T], key: impl Fn(&T) -> &str) -> Vec<u32> {
    let Some(first) = v.first().map(|x| key(x).as_bytes()) else {
        return Vec::new();
    };
    let mut common = first.len();
    for x in &v[1..] {
        let k = key(x).as_bytes();
        common = common.min(k.len());
        common = first[..common]
            .iter()
            .zip(k)
            .position(|(a, b)| a != b)
            .unwrap_or(common);
    }
    let mut keyed: Vec<(u128, u32)> = v
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let tail = &key(x).as_bytes()[common..];
            let mut buf = [0u8; 16];
            let n = tail.len().min(16);
            buf[..n].copy_from_slice(&tail[..n]);
            (
                u128::from_be_bytes(buf),
                u32::try_from(i).expect("fewer than 2^32 elements"),
            )
        })
        .collect();
    keyed.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| str_cmp(key(&v[a.1 as usize]), key(&v[b.1 as usize])))
            .then(a.1.cmp(&b.1))
    });
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// `v` sorted stably by `key`, as [`sorted_positions_by_str`] orders it.
pub fn sort_by_str_key<T>(v: &mut Vec<T>, key: impl Fn(&T) -> &str) {
    if v.len() < 2 {
        return;
    }
    let order = sorted_positions_by_str(v, key);
    let mut slots: Vec<Option<T>> = std::mem::take(v).into_iter().map(Some).collect();
    v.extend(order.into_iter().map(|i| {
        slots[i as usize]
            .take()
            .expect("a permutation visits each once")
    }));
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

    #[test]
    fn sort_by_str_key_is_a_stable_str_sort() {
        let mut rng = crate::core::rng::Rng::new(11);
        for round in 0..400 {
            let n = (rng.next_u64() % 60) as usize;
            let prefix = if round % 2 == 0 { "zzzzz-dz642-" } else { "" };
            let mut v: Vec<(String, usize)> = (0..n)
                .map(|i| {
                    let len = (rng.next_u64() % 24) as usize;
                    let tail: String = (0..len)
                        .map(|_| ['a', 'b', '\0', 'z'][(rng.next_u64() % 4) as usize])
                        .collect();
                    (format!("{prefix}{tail}"), i)
                })
                .collect();
            let mut want = v.clone();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            sort_by_str_key(&mut v, |x| x.0.as_str());
            assert_eq!(v, want, "round {round}");
        }
    }
}
