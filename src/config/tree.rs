//! A path-aware view of the parsed YAML: sections with known keys, and typed getters whose errors
//! name the full key path.
//!
//! Key matching follows Arvados, whose loader decodes through Go's `encoding/json`: keys match
//! their field case-insensitively, and a key that is spelled differently from the field is used
//! but reported. In a strict section any other key is reported as unknown; in a lenient one it is
//! accepted silently (an operator pastes the whole cluster config, most of which is for other
//! services). A YAML `null` counts as absent, so the default applies, as in Arvados.
//!
//! Invariant: no error or warning produced here contains a value read from a key marked secret,
//! and the generic getters print a value only when it is a scalar of a non-secret key.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::ConfigError;
use super::units::{self, UnitError};

/// One key of a section, with the path used in messages.
#[derive(Clone, Debug)]
pub(crate) struct Entry<'a> {
    /// The full dotted path, as written in the file (`Clusters.zzzzz.Containers.CloudVMs.ImageID`).
    pub path: String,
    /// The value; never `Null` (a null entry is dropped).
    pub value: &'a Value,
}

/// A mapping of the config whose keys are checked against a known list.
#[derive(Debug)]
pub(crate) struct Section<'a> {
    /// The dotted path of the mapping itself.
    pub path: String,
    /// Known keys that are present, by their canonical spelling.
    entries: BTreeMap<&'static str, Entry<'a>>,
}

/// Whether unknown keys are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keys {
    /// Report each unknown key as a warning.
    Strict,
    /// Accept unknown keys silently.
    Lenient,
}

/// Joins a path and a key.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The name of a value's YAML kind, for "expected X, got Y" messages that must not show the value.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Strips YAML tags (`!foo bar` is read as `bar`).
pub(crate) fn untag(mut value: &Value) -> &Value {
    while let Value::Tagged(t) = value {
        value = &t.value;
    }
    value
}

/// A mapping key as text. Scalars are rendered (`1`, `true`); other keys are an error.
pub(crate) fn key_text(path: &str, key: &Value) -> Result<String, ConfigError> {
    match untag(key) {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok("null".into()),
        other => Err(ConfigError::invalid(
            path,
            format!("keys must be strings, found {} used as a key", kind(other)),
        )),
    }
}

/// The entries of a mapping value in document order, with their key text and path. `None` or null
/// is an empty mapping; any other kind is an error.
pub(crate) fn mapping_entries<'a>(
    path: &str,
    value: Option<&'a Value>,
) -> Result<Vec<(String, Entry<'a>)>, ConfigError> {
    let Some(value) = value.map(untag) else {
        return Ok(Vec::new());
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Mapping(m) => {
            let mut out = Vec::with_capacity(m.len());
            for (k, v) in m {
                let key = key_text(path, k)?;
                let v = untag(v);
                out.push((
                    key.clone(),
                    Entry {
                        path: join(path, &key),
                        value: v,
                    },
                ));
            }
            Ok(out)
        }
        other => Err(ConfigError::invalid(
            path,
            format!("expected a mapping, got {}", kind(other)),
        )),
    }
}

impl<'a> Section<'a> {
    /// Reads the mapping at `path`, matching its keys against `known`.
    pub fn new(
        path: &str,
        value: Option<&'a Value>,
        known: &[&'static str],
        mode: Keys,
        warnings: &mut Vec<String>,
    ) -> Result<Section<'a>, ConfigError> {
        let mut entries: BTreeMap<&'static str, Entry<'a>> = BTreeMap::new();
        // Whether the stored entry for a canonical key used the exact spelling.
        let mut exact: BTreeMap<&'static str, bool> = BTreeMap::new();
        for (key, entry) in mapping_entries(path, value)? {
            let canonical = known
                .iter()
                .find(|k| **k == key)
                .or_else(|| known.iter().find(|k| k.eq_ignore_ascii_case(&key)));
            let Some(&canonical) = canonical else {
                if mode == Keys::Strict {
                    warnings.push(format!("{}: unknown key", entry.path));
                }
                continue;
            };
            let is_exact = canonical == key;
            if !is_exact {
                warnings.push(format!(
                    "{}: unknown key; it is used as {canonical}, as Arvados matches keys case-insensitively",
                    entry.path
                ));
            }
            if matches!(entry.value, Value::Null) {
                continue;
            }
            if let Some(previous) = entries.get(canonical) {
                // The exact spelling wins over a differently-cased one; otherwise the first wins.
                let keep_new = is_exact && !exact.get(canonical).copied().unwrap_or(false);
                let (kept, dropped) = if keep_new {
                    (entry.path.clone(), previous.path.clone())
                } else {
                    (previous.path.clone(), entry.path.clone())
                };
                warnings.push(format!("{dropped}: ignored: {kept} is also set"));
                if !keep_new {
                    continue;
                }
            }
            exact.insert(canonical, is_exact);
            entries.insert(canonical, entry);
        }
        Ok(Section {
            path: path.to_string(),
            entries,
        })
    }

    /// An empty section at `path`.
    pub fn empty(path: &str) -> Section<'a> {
        Section {
            path: path.to_string(),
            entries: BTreeMap::new(),
        }
    }

    /// The entry for a known key, if present and not null.
    pub fn get(&self, key: &str) -> Option<&Entry<'a>> {
        self.entries.get(key)
    }

    /// Whether a known key is present and not null.
    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The path a key of this section would have.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Takes a known key out of the section (for moving legacy keys).
    pub fn take(&mut self, key: &str) -> Option<Entry<'a>> {
        self.entries.remove(key)
    }

    /// Puts an entry under a known key (for merging a legacy section into the current one).
    pub fn put(&mut self, key: &'static str, entry: Entry<'a>) {
        self.entries.insert(key, entry);
    }

    /// The known keys present, in canonical order.
    pub fn keys(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// A string value, or `default`.
    pub fn string(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        self.get(key)
            .map_or_else(|| Ok(default.to_string()), Entry::string)
    }

    /// A secret string value, or "".
    pub fn secret(&self, key: &str) -> Result<String, ConfigError> {
        self.get(key)
            .map_or_else(|| Ok(String::new()), Entry::secret)
    }

    /// A boolean, or `default`.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        self.get(key).map_or(Ok(default), Entry::bool)
    }

    /// An integer, or `default`.
    pub fn int(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        self.get(key).map_or(Ok(default), Entry::int)
    }

    /// A float, or `default`.
    pub fn float(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        self.get(key).map_or(Ok(default), Entry::float)
    }

    /// A duration in signed nanoseconds, or `default`.
    pub fn duration(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        self.get(key).map_or(Ok(default), Entry::duration)
    }

    /// A byte size, or `default`.
    pub fn byte_size(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        self.get(key).map_or(Ok(default), Entry::byte_size)
    }

    /// A list of strings, or empty.
    pub fn string_list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        self.get(key)
            .map_or_else(|| Ok(Vec::new()), Entry::string_list)
    }

    /// A map of strings, or empty. `SAMPLE` keys are dropped, as Arvados does.
    pub fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        self.get(key)
            .map_or_else(|| Ok(BTreeMap::new()), Entry::string_map)
    }
}

/// A scalar rendered as text, or `None` for a list or mapping.
fn scalar_text(value: &Value) -> Option<String> {
    match untag(value) {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// A value quoted for a message: strings in quotes, numbers and booleans bare, others by kind.
fn shown(value: &Value) -> String {
    match untag(value) {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_string(),
    }
}

impl Entry<'_> {
    fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(&self.path, message)
    }

    /// A string. Numbers and booleans are taken as written, as Arvados does for string fields.
    pub fn string(&self) -> Result<String, ConfigError> {
        scalar_text(self.value)
            .ok_or_else(|| self.err(format!("expected a string, got {}", kind(self.value))))
    }

    /// A secret string: like [`Entry::string`], and the error never shows the value.
    pub fn secret(&self) -> Result<String, ConfigError> {
        scalar_text(self.value)
            .ok_or_else(|| self.err(format!("expected a string, got {}", kind(self.value))))
    }

    /// A boolean. The YAML 1.1 spellings that Arvados (go-yaml v2) accepts are accepted too.
    pub fn bool(&self) -> Result<bool, ConfigError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            Value::String(s) => match s.as_str() {
                "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On"
                | "ON" => Ok(true),
                "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off"
                | "OFF" => Ok(false),
                _ => Err(self.err(format!("expected true or false, got {}", shown(self.value)))),
            },
            other => Err(self.err(format!("expected true or false, got {}", shown(other)))),
        }
    }

    /// An integer. A float with no fraction (`8.0`) is accepted, as Arvados does.
    pub fn int(&self) -> Result<i64, ConfigError> {
        match self.value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    return Ok(i);
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
                    _ => Err(self.err(format!("expected an integer, got {n}"))),
                }
            }
            other => Err(self.err(format!("expected an integer, got {}", shown(other)))),
        }
    }

    /// A finite number.
    pub fn float(&self) -> Result<f64, ConfigError> {
        match self.value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(f),
                _ => Err(self.err(format!("expected a finite number, got {n}"))),
            },
            other => Err(self.err(format!("expected a number, got {}", shown(other)))),
        }
    }

    /// A Go duration string, or the number 0, as signed nanoseconds.
    pub fn duration(&self) -> Result<i64, ConfigError> {
        match self.value {
            Value::String(s) => units::parse_duration(s)
                .map_err(|e| self.err(format!("invalid duration {s:?}: {e}"))),
            Value::Number(n) if n.as_f64() == Some(0.0) => Ok(0),
            Value::Number(n) => Err(self.err(format!(
                "invalid duration {n}: {} (such as {n}s)",
                UnitError::MissingUnit
            ))),
            other => Err(self.err(format!(
                "expected a duration such as \"30s\", got {}",
                shown(other)
            ))),
        }
    }

    /// An Arvados byte size: a number of bytes, or a string with a unit.
    pub fn byte_size(&self) -> Result<i64, ConfigError> {
        match self.value {
            Value::String(s) => units::parse_byte_size(s)
                .map_err(|e| self.err(format!("invalid byte size {s:?}: {e}"))),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(i),
                (None, Some(f)) => units::bytes_from_f64(f)
                    .map_err(|e| self.err(format!("invalid byte size {n}: {e}"))),
                (None, None) => Err(self.err(format!("invalid byte size {n}"))),
            },
            other => Err(self.err(format!(
                "expected a byte size such as \"64GiB\", got {}",
                shown(other)
            ))),
        }
    }

    /// A list of strings (scalars are taken as written).
    pub fn string_list(&self) -> Result<Vec<String>, ConfigError> {
        match self.value {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    scalar_text(v).ok_or_else(|| {
                        ConfigError::invalid(
                            format!("{}[{i}]", self.path),
                            format!("expected a string, got {}", kind(v)),
                        )
                    })
                })
                .collect(),
            other => Err(self.err(format!("expected a list of strings, got {}", kind(other)))),
        }
    }

    /// A map of strings (scalars are taken as written). `SAMPLE` keys are dropped.
    pub fn string_map(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut out = BTreeMap::new();
        for (key, entry) in mapping_entries(&self.path, Some(self.value))? {
            if key == "SAMPLE" {
                continue;
            }
            let text = scalar_text(entry.value).ok_or_else(|| {
                ConfigError::invalid(
                    &entry.path,
                    format!("expected a string, got {}", kind(entry.value)),
                )
            })?;
            out.insert(key, text);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        serde_yaml::from_str(text).expect("test YAML parses")
    }

    #[test]
    fn unknown_and_case_variant_keys_are_reported() {
        let v = parse("TimeoutIdle: 1m\nTimeoutIdel: 2m\ntimeoutbooting: 3m\n");
        let mut w = Vec::new();
        let s = Section::new(
            "C",
            Some(&v),
            &["TimeoutIdle", "TimeoutBooting"],
            Keys::Strict,
            &mut w,
        )
        .expect("section");
        assert_eq!(s.duration("TimeoutIdle", 0).expect("idle"), 60_000_000_000);
        assert_eq!(
            s.duration("TimeoutBooting", 0).expect("booting"),
            180_000_000_000
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0], "C.TimeoutIdel: unknown key");
        assert!(w[1].starts_with("C.timeoutbooting: unknown key; it is used as TimeoutBooting"));
    }

    #[test]
    fn exact_spelling_wins_over_case_variant() {
        let v = parse("runtimeengine: a\nRuntimeEngine: b\n");
        let mut w = Vec::new();
        let s =
            Section::new("C", Some(&v), &["RuntimeEngine"], Keys::Strict, &mut w).expect("section");
        assert_eq!(s.string("RuntimeEngine", "").expect("engine"), "b");
        assert!(
            w.iter()
                .any(|m| m == "C.runtimeengine: ignored: C.RuntimeEngine is also set"),
            "{w:?}"
        );
    }

    #[test]
    fn lenient_sections_are_silent() {
        let v = parse("SLURM: {x: 1}\nWhatever: 2\n");
        let mut w = Vec::new();
        let s = Section::new("C", Some(&v), &["SLURM"], Keys::Lenient, &mut w).expect("section");
        assert!(w.is_empty());
        assert_eq!(s.keys(), vec!["SLURM"]);
    }

    #[test]
    fn null_means_default() {
        let v = parse("A:\nB: ~\n");
        let mut w = Vec::new();
        let s = Section::new("C", Some(&v), &["A", "B"], Keys::Strict, &mut w).expect("section");
        assert_eq!(s.int("A", 7).expect("A"), 7);
        assert_eq!(s.string("B", "x").expect("B"), "x");
    }

    #[test]
    fn type_errors_name_path_and_value() {
        let v = parse("N: abc\nI: 1.5\nB: maybe\nD: 60\nS: [1]\nZ: 64GiBs\n");
        let mut w = Vec::new();
        let s = Section::new(
            "P",
            Some(&v),
            &["N", "I", "B", "D", "S", "Z"],
            Keys::Strict,
            &mut w,
        )
        .expect("section");
        let msg = |r: Result<String, ConfigError>| r.expect_err("must fail").to_string();
        assert_eq!(
            msg(s.float("N", 0.0).map(|f| f.to_string())),
            r#"P.N: expected a number, got "abc""#
        );
        assert_eq!(
            msg(s.int("I", 0).map(|f| f.to_string())),
            "P.I: expected an integer, got 1.5"
        );
        assert_eq!(
            msg(s.bool("B", false).map(|f| f.to_string())),
            r#"P.B: expected true or false, got "maybe""#
        );
        assert!(
            msg(s.duration("D", 0).map(|f| f.to_string()))
                .starts_with("P.D: invalid duration 60: missing unit")
        );
        assert_eq!(msg(s.string("S", "")), "P.S: expected a string, got a list");
        assert!(
            msg(s.byte_size("Z", 0).map(|f| f.to_string()))
                .starts_with(r#"P.Z: invalid byte size "64GiBs""#)
        );
    }

    #[test]
    fn scalars_are_strings_when_a_string_is_wanted() {
        let v = parse("Port: 22\nVer: 11.0\nFlag: true\n");
        let mut w = Vec::new();
        let s = Section::new(
            "P",
            Some(&v),
            &["Port", "Ver", "Flag"],
            Keys::Strict,
            &mut w,
        )
        .expect("section");
        assert_eq!(s.string("Port", "").expect("port"), "22");
        assert_eq!(s.string("Ver", "").expect("ver"), "11.0");
        assert_eq!(s.string("Flag", "").expect("flag"), "true");
    }

    #[test]
    fn yaml_11_booleans() {
        let v = parse("A: yes\nB: off\nC: true\n");
        let mut w = Vec::new();
        let s =
            Section::new("P", Some(&v), &["A", "B", "C"], Keys::Strict, &mut w).expect("section");
        assert!(s.bool("A", false).expect("A"));
        assert!(!s.bool("B", true).expect("B"));
        assert!(s.bool("C", false).expect("C"));
    }
}
