//! The EC2 instance quota group of an instance type (reference-workers.md §6.2,
//! `InstanceQuotaGroup`).
//!
//! EC2 counts vCPU quotas per family group ("standard", "p5", ...), so a `VcpuLimitExceeded` for
//! one type says nothing about types in another group. The group is derived from the provider type
//! name and `DriverParameters.InstanceTypeQuotaGroups`, a prefix → group map. The loader merges the
//! operator's map over [`shipped_ec2_quota_groups`], as Arvados merges config.default.yml.

use std::collections::BTreeMap;

/// The quota group of an EC2 instance type.
///
/// 1. The provider type is lower-cased.
/// 2. The base group is its alphabetic (`a`–`z`) prefix, before the first other character. An
///    all-letter name has no such character, and its group is "".
/// 3. Each prefix from the alphabetic prefix itself up to (not including) the full name that is a
///    key of `groups` replaces the group; the longest match wins. Shorter prefixes and the full
///    name are not looked up.
/// 4. `-spot` is appended for a preemptible type.
pub fn ec2_quota_group(
    provider_type: &str,
    preemptible: bool,
    groups: &BTreeMap<String, String>,
) -> String {
    let pt = provider_type.to_lowercase();
    let mut group = String::new();
    if let Some(alpha_len) = pt.find(|c: char| !c.is_ascii_lowercase()) {
        group = pt[..alpha_len].to_string();
        // Prefix ends are char boundaries from the alphabetic length to the last char's start.
        for (end, _) in pt.char_indices().filter(|(i, _)| *i >= alpha_len) {
            if let Some(g) = groups.get(&pt[..end]) {
                group = g.clone();
            }
        }
    }
    if preemptible {
        group.push_str("-spot");
    }
    group
}

/// The `InstanceTypeQuotaGroups` map that Arvados ships in config.default.yml.
pub fn shipped_ec2_quota_groups() -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = ["a", "c", "d", "h", "i", "m", "r", "t", "z"]
        .into_iter()
        .map(|p| (p.to_string(), "standard".to_string()))
        .collect();
    m.insert("vt".into(), "g".into());
    m.insert("p5".into(), "p5".into());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_map() -> BTreeMap<String, String> {
        [
            ("a", "standard"),
            ("m", "standard"),
            ("t", "standard"),
            ("p5", "p5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn reference_examples() {
        let m = test_map();
        let table: &[(&str, bool, &str)] = &[
            ("g1.large", false, "g"),
            ("x1.large", false, "x"),
            ("inf1.2xlarge", false, "inf"),
            ("a1.small", false, "standard"),
            ("m1.xlarge", false, "standard"),
            ("m1.xlarge", true, "standard-spot"),
            ("p4.xlarge", true, "p-spot"),
            ("p5.xlarge", true, "p5-spot"),
            ("t3.2xlarge", false, "standard"),
            ("trn1.2xlarge", false, "trn"),
            ("trn1.2xlarge", true, "trn-spot"),
            ("imaginary9.5xlarge", false, "imaginary"),
            ("", false, ""),
        ];
        for (pt, spot, want) in table {
            assert_eq!(
                ec2_quota_group(pt, *spot, &m),
                *want,
                "{pt} preemptible={spot}"
            );
        }
    }

    #[test]
    fn case_and_odd_names() {
        let m = test_map();
        assert_eq!(ec2_quota_group("M5.Large", false, &m), "standard");
        assert_eq!(ec2_quota_group("P5.48XLARGE", false, &m), "p5");
        // All letters: no non-letter character, so no group.
        assert_eq!(ec2_quota_group("metal", false, &m), "");
        // The full name is never looked up.
        let full: BTreeMap<String, String> = [("x1.large".to_string(), "big".to_string())].into();
        assert_eq!(ec2_quota_group("x1.large", false, &full), "x");
        // The longest matching prefix wins.
        let nested: BTreeMap<String, String> = [
            ("c".to_string(), "standard".to_string()),
            ("c7g".to_string(), "graviton".to_string()),
        ]
        .into();
        assert_eq!(ec2_quota_group("c7g.large", false, &nested), "graviton");
        assert_eq!(ec2_quota_group("c6i.large", false, &nested), "standard");
        // Non-ASCII names do not panic.
        assert_eq!(ec2_quota_group("é1.large", false, &m), "");
    }

    #[test]
    fn shipped_map() {
        let m = shipped_ec2_quota_groups();
        assert_eq!(ec2_quota_group("c5.large", false, &m), "standard");
        assert_eq!(ec2_quota_group("vt1.3xlarge", false, &m), "g");
        assert_eq!(ec2_quota_group("g5.xlarge", false, &m), "g");
        assert_eq!(ec2_quota_group("p5.48xlarge", true, &m), "p5-spot");
        assert_eq!(ec2_quota_group("p4d.24xlarge", false, &m), "p");
    }
}
