//! [`Key`]: a string kept in place when it is short, for the keys of the core's hot maps.
//!
//! The core's maps are keyed by container UUIDs (27 bytes) and cloud instance IDs (10–20
//! bytes). As `String`s, every B-tree node holds pointers, and each comparison in a lookup or
//! a merge first loads the key's bytes from a separate heap block: a cache miss per key
//! visited when the map is large. A `Key` of up to [`INLINE`] bytes keeps them in the node
//! (longer ones go to the heap), so a lookup reads only the nodes it walks, and two inline
//! keys compare as four integers without calling `memcmp`.
//!
//! Invariants: a `Key` orders, hashes and compares equal exactly as its `&str` does (so
//! `Borrow<str>` is sound and a `BTreeMap<Key, _>` iterates in `BTreeMap<String, _>`'s order,
//! and is looked up by `&str`); the unused inline bytes are zero.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The longest string kept in place.
pub const INLINE: usize = 30;

/// A string, in place when at most [`INLINE`] bytes long. 32 bytes.
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    /// `bytes[..len]` is the string; the rest is zero.
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

impl Key {
    /// A key holding `s`.
    pub fn new(s: &str) -> Key {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            copy_short(&mut bytes, s.as_bytes());
            Key(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            Key(Repr::Heap(s.into()))
        }
    }

    /// The string.
    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let b = &bytes[..usize::from(*len)];
                debug_assert!(std::str::from_utf8(b).is_ok());
                // SAFETY: `bytes[..len]` is a copy of a whole `&str` (`Key::new` is the only
                // constructor of `Inline`, and nothing mutates it), so it is valid UTF-8.
                // Validating on every read would cost more than the comparisons it serves.
                unsafe { std::str::from_utf8_unchecked(b) }
            }
            Repr::Heap(s) => s,
        }
    }
}

/// Copies `src` (at most [`INLINE`] bytes) to the start of `dst`. A copy of a variable
/// length is a call to `memcpy`, which costs more than the lookup the key is built for; two
/// copies of a fixed size that overlap in the middle cover every length of their range and
/// compile to a few moves.
#[inline]
fn copy_short(dst: &mut [u8; INLINE], src: &[u8]) {
    let n = src.len();
    debug_assert!(n <= INLINE);
    if n >= 16 {
        dst[..16].copy_from_slice(&src[..16]);
        dst[n - 16..n].copy_from_slice(&src[n - 16..]);
    } else if n >= 8 {
        dst[..8].copy_from_slice(&src[..8]);
        dst[n - 8..n].copy_from_slice(&src[n - 8..]);
    } else if n >= 4 {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..n].copy_from_slice(&src[n - 4..]);
    } else if n > 0 {
        // 1 to 3 bytes: the first, the middle and the last cover them.
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    }
}

/// Big-endian words of a zero-padded inline key, compared in order: the same order as the
/// bytes'. The last word overlaps the third by two bytes; those bytes are equal whenever the
/// last word decides, so the overlap changes nothing.
#[inline]
fn words(b: &[u8; INLINE]) -> [u64; 4] {
    let w = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    [w(0), w(8), w(16), w(INLINE - 8)]
}

impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Key) -> Ordering {
        match (&self.0, &other.0) {
            // Zero padding keeps the order of strings where one is a prefix of the other:
            // their padded bytes are equal up to the longer one's extra bytes, which are ≥ 0;
            // equal padded bytes leave the lengths to decide, as `str::cmp` does.
            (Repr::Inline { len: la, bytes: a }, Repr::Inline { len: lb, bytes: b }) => {
                words(a).cmp(&words(b)).then(la.cmp(lb))
            }
            _ => super::fastcmp::str_cmp(self.as_str(), other.as_str()),
        }
    }
}

impl PartialOrd for Key {
    #[inline]
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    #[inline]
    fn eq(&self, other: &Key) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline { len: la, bytes: a }, Repr::Inline { len: lb, bytes: b }) => {
                la == lb && a == b
            }
            _ => self.as_str() == other.as_str(),
        }
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Deref for Key {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Key {
    #[inline]
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::new(s)
    }
}

impl From<&String> for Key {
    fn from(s: &String) -> Key {
        Key::new(s)
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        if s.len() <= INLINE {
            Key::new(&s)
        } else {
            Key(Repr::Heap(s.into_boxed_str()))
        }
    }
}

impl From<&Key> for String {
    fn from(k: &Key) -> String {
        k.as_str().to_string()
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.as_str().to_string()
    }
}

impl PartialEq<str> for Key {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Key {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Key> for String {
    fn eq(&self, other: &Key) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Key> for &str {
    fn eq(&self, other: &Key) -> bool {
        *self == other.as_str()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Default for Key {
    fn default() -> Key {
        Key::new("")
    }
}

impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        String::deserialize(d).map(Key::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rng::Rng;
    use std::collections::BTreeMap;

    /// Strings that stress the order: shared prefixes, prefixes of each other, zero bytes,
    /// bytes ≥ 0x80, lengths around the inline limit and the word boundaries.
    fn strings(rng: &mut Rng, n: usize) -> Vec<String> {
        let alphabet = ["\0", "0", "1", "z", "-", "é", "\u{7f}", "a"];
        (0..n)
            .map(|_| {
                let len = rng.below(40) as usize;
                let mut s = if rng.below(2) == 0 {
                    "zzzzz-dz642-".to_string()
                } else {
                    String::new()
                };
                while s.len() < len {
                    s.push_str(alphabet[rng.below(alphabet.len() as u64) as usize]);
                }
                s
            })
            .collect()
    }

    #[test]
    fn orders_and_compares_as_str() {
        let mut rng = Rng::new(7);
        let v = strings(&mut rng, 400);
        let keys: Vec<Key> = v.iter().map(Key::from).collect();
        for (i, a) in v.iter().enumerate() {
            assert_eq!(keys[i].as_str(), a);
            for (j, b) in v.iter().enumerate() {
                assert_eq!(keys[i].cmp(&keys[j]), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(keys[i] == keys[j], a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn map_iterates_and_looks_up_as_string_map() {
        let mut rng = Rng::new(11);
        let v = strings(&mut rng, 2000);
        let by_string: BTreeMap<String, usize> =
            v.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect();
        let by_key: BTreeMap<Key, usize> = v
            .iter()
            .enumerate()
            .map(|(i, s)| (Key::from(s.as_str()), i))
            .collect();
        assert!(
            by_string
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .eq(by_key.iter().map(|(k, v)| (k.as_str(), *v)))
        );
        for s in &v {
            assert_eq!(by_key.get(s.as_str()), by_string.get(s));
        }
        assert_eq!(by_key.get("not there"), None);
    }

    #[test]
    fn every_inline_length_is_copied_exactly() {
        let all = "abcdefghijklmnopqrstuvwxyz0123456789";
        for n in 0..=INLINE {
            let k = Key::new(&all[..n]);
            assert_eq!(k.as_str(), &all[..n]);
            let Repr::Inline { bytes, .. } = &k.0 else {
                panic!("{n} bytes should be inline");
            };
            assert!(
                bytes[n..].iter().all(|&b| b == 0),
                "padding after {n} bytes"
            );
        }
    }

    #[test]
    fn long_strings_go_to_the_heap_and_round_trip() {
        let long = "x".repeat(INLINE + 1);
        let k = Key::from(long.clone());
        assert!(matches!(k.0, Repr::Heap(_)));
        assert_eq!(String::from(&k), long);
        let short = Key::from("zzzzz-dz642-000000000000001");
        assert!(matches!(short.0, Repr::Inline { .. }));
        assert_eq!(std::mem::size_of::<Key>(), 32);
        assert_eq!(
            format!("{short} {short:?}"),
            "zzzzz-dz642-000000000000001 \"zzzzz-dz642-000000000000001\""
        );
    }
}
