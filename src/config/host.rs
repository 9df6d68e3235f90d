//! Sizing this host for the loopback driver's implicit `localhost` instance type.
//!
//! This is the only place where the config loader looks at the machine: the CPU count, the RAM
//! (`MemTotal` in /proc/meminfo) and the size of the temporary directory's filesystem (`TMPDIR`,
//! else /tmp), as Arvados does. The core never does this.

use std::path::Path;

use crate::core::types::InstanceType;

/// The `localhost` type that Arvados synthesizes when the loopback driver has no instance type:
/// this host's CPUs, RAM and TMPDIR filesystem size, at price 1.0.
pub(super) fn localhost_type() -> Result<InstanceType, String> {
    let vcpus = std::thread::available_parallelism()
        .map_err(|e| format!("counting CPUs: {e}"))?
        .get();
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("reading /proc/meminfo: {e}"))?;
    let ram = mem_total(&meminfo).ok_or("reading /proc/meminfo: no MemTotal line")?;
    let tmp = std::env::temp_dir();
    let scratch = filesystem_size(&tmp)
        .map_err(|e| format!("sizing the filesystem of {}: {e}", tmp.display()))?;
    Ok(InstanceType {
        name: "localhost".into(),
        provider_type: "localhost".into(),
        vcpus: i64::try_from(vcpus).unwrap_or(i64::MAX),
        ram,
        included_scratch: scratch,
        added_scratch: 0,
        scratch,
        price: 1.0,
        preemptible: false,
        gpu: Default::default(),
        quota_group: String::new(),
    })
}

/// `MemTotal` from /proc/meminfo, in bytes (the file gives kB, meaning KiB).
fn mem_total(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: i64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// The total size of the filesystem holding `path`, in bytes.
#[cfg(unix)]
fn filesystem_size(path: &Path) -> Result<i64, String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path contains a NUL byte".to_string())?;
    // SAFETY: `statvfs` is plain old data, for which all zeros is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid, writable statvfs that
    // outlives the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field types differ between platforms"
    )]
    let bytes = (stat.f_blocks as u128) * (stat.f_frsize as u128);
    Ok(i64::try_from(bytes).unwrap_or(i64::MAX))
}

/// Without statvfs, the size is unknown.
#[cfg(not(unix))]
fn filesystem_size(_path: &Path) -> Result<i64, String> {
    Err("filesystem sizes are only known on Unix".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24591484 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total(text), Some(24_591_484 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn this_host_can_be_sized() {
        let t = localhost_type().expect("this test host can be sized");
        assert_eq!(t.name, "localhost");
        assert_eq!(t.provider_type, "localhost");
        assert!(t.vcpus >= 1);
        assert!(t.ram > 0);
        assert!(t.scratch > 0);
        assert_eq!(t.scratch, t.included_scratch);
        assert_eq!(t.price, 1.0);
    }
}
