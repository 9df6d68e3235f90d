//! The exact remote command strings of the crunch-run protocol (reference-workers.md §2).
//!
//! These are wire contracts with the Go crunch-run: the quoting, the `sudo ` prefix for a
//! non-root user, the `crunch-run~<md5>` naming and the `--list` output format must match it
//! byte for byte.

/// The path the instance secret is written to on a new VM.
pub const SECRET_PATH: &str = "/var/run/arvados-instance-secret";

/// How the dispatcher invokes crunch-run on workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerSpec {
    /// The remote command (`crunch-run` or `<dir>/crunch-run~<md5>`).
    pub command: String,
    /// MD5 of the binary to deploy, when `DeployRunnerBinary` is set.
    pub md5: Option<String>,
    /// Why the binary could not be loaded; creates are refused and health fails while set.
    pub load_error: Option<String>,
}

impl RunnerSpec {
    /// No deployment: run `crunch_run_command` as installed on the image.
    pub fn installed(crunch_run_command: &str) -> RunnerSpec {
        RunnerSpec {
            command: crunch_run_command.to_string(),
            md5: None,
            load_error: None,
        }
    }

    /// Deploy a binary with this MD5 (hex) into `dir`.
    pub fn deployed(dir: &str, md5_hex: &str) -> RunnerSpec {
        RunnerSpec {
            command: format!("{}/crunch-run~{md5_hex}", dir.trim_end_matches('/')),
            md5: Some(md5_hex.to_string()),
            load_error: None,
        }
    }

    /// The binary at `path` could not be read.
    pub fn unloadable(path: &str, err: &str) -> RunnerSpec {
        RunnerSpec {
            command: String::new(),
            md5: None,
            load_error: Some(format!("error loading runner binary {path:?}: {err}")),
        }
    }
}

/// `'…'` quoting with `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sudo(remote_user: &str) -> &'static str {
    if needs_sudo(remote_user) { "sudo " } else { "" }
}

/// Whether commands for `remote_user` run under `sudo` (everyone but root).
pub fn needs_sudo(remote_user: &str) -> bool {
    remote_user != "root"
}

/// `<runner> --list`.
pub fn list_command(runner: &str, remote_user: &str) -> String {
    format!("{}{runner} --list", sudo(remote_user))
}

/// `<runner> --list --stdin-prices`: the run probe when the instance has a price history,
/// which goes on stdin as a JSON array (§2.3).
pub fn list_command_with_prices(runner: &str, remote_user: &str) -> String {
    format!("{} --stdin-prices", list_command(runner, remote_user))
}

/// `<runner> --detach --stdin-config '<arg>'… '<uuid>'`.
pub fn start_command(runner: &str, remote_user: &str, args: &[String], uuid: &str) -> String {
    let mut cmd = format!("{}{runner} --detach --stdin-config", sudo(remote_user));
    for a in args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    }
    cmd.push(' ');
    cmd.push_str(&shell_quote(uuid));
    cmd
}

/// `<runner> --kill 15 <uuid>` (the UUID is not quoted).
pub fn kill_command(runner: &str, remote_user: &str, uuid: &str) -> String {
    format!("{}{runner} --kill 15 {uuid}", sudo(remote_user))
}

/// `md5sum <runner>` (never with sudo).
pub fn md5_command(runner: &str) -> String {
    format!("md5sum {runner}")
}

/// What `md5sum` prints for a correct binary.
pub fn md5_expected(runner: &str, md5_hex: &str) -> String {
    format!("{md5_hex}  {runner}\n")
}

/// The install command; its stdin is the binary.
pub fn install_command(dir: &str, runner: &str, remote_user: &str) -> String {
    let cmd = format!(
        "set -e; dstdir=\"{}/\"; dstfile=\"{runner}\"; mkdir -p \"$dstdir\"; touch \"$dstfile\"; chmod 0755 \"$dstdir\" \"$dstfile\"; cat >\"$dstfile\"",
        dir.trim_end_matches('/')
    );
    if remote_user == "root" {
        cmd
    } else {
        format!("sudo sh -c {}", shell_quote(&cmd))
    }
}

/// The init command that plants the secret, followed by `InstanceInitCommand`.
pub fn init_command(secret: &str, instance_init_command: &str) -> String {
    format!("umask 0177 && echo -n \"{secret}\" >{SECRET_PATH}\n{instance_init_command}")
}

/// What one `--list` run reported, borrowing the output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListReport<'a> {
    /// Running containers, in output order.
    pub uuids: Vec<&'a str>,
    /// The worker reported `broken`.
    pub broken: bool,
    /// Some line said `<uuid> stale`.
    pub stale: bool,
}

/// Parses `--list` output (§2.3). Lines of other clusters are ignored.
pub fn parse_list<'a>(stdout: &'a str, cluster_id: &str) -> ListReport<'a> {
    let mut r = ListReport::default();
    for line in stdout.split('\n') {
        if line.is_empty() {
            continue;
        }
        if line == "broken" {
            r.broken = true;
            continue;
        }
        if !line.starts_with(cluster_id) {
            continue;
        }
        // One word is a UUID; a second word "stale" marks a stale lock.
        let mut words = line.split(' ');
        let uuid = words.next().unwrap_or_default();
        match words.next() {
            None => r.uuids.push(uuid),
            Some("stale") => r.stale = true,
            Some(_) => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_command_matches_the_go_test() {
        let args = vec![
            "--runtime-engine=stub".to_string(),
            "--foo".to_string(),
            "--extra='args'".to_string(),
        ];
        assert_eq!(
            start_command("crunch-run", "root", &args, "zzzzz-dz642-000000000000001"),
            "crunch-run --detach --stdin-config '--runtime-engine=stub' '--foo' '--extra='\\''args'\\''' 'zzzzz-dz642-000000000000001'"
        );
        assert!(start_command("crunch-run", "debian", &args, "u").starts_with("sudo crunch-run"));
    }

    #[test]
    fn install_command_is_wrapped_for_non_root() {
        let root = install_command(
            "/tmp/arvados-crunch-run",
            "/tmp/arvados-crunch-run/crunch-run~ab",
            "root",
        );
        assert_eq!(
            root,
            "set -e; dstdir=\"/tmp/arvados-crunch-run/\"; dstfile=\"/tmp/arvados-crunch-run/crunch-run~ab\"; mkdir -p \"$dstdir\"; touch \"$dstfile\"; chmod 0755 \"$dstdir\" \"$dstfile\"; cat >\"$dstfile\""
        );
        let user = install_command("/tmp/d", "/tmp/d/crunch-run~ab", "admin");
        assert!(user.starts_with("sudo sh -c 'set -e; "));
        assert!(user.ends_with("cat >\"$dstfile\"'"));
    }

    #[test]
    fn list_parsing_follows_the_protocol() {
        let out = "zzzzz-dz642-000000000000001\nzzzzz-dz642-000000000000002 stale\nyyyyy-dz642-000000000000003\nbroken\nzzzzz-dz642-x y z\n\n";
        let r = parse_list(out, "zzzzz");
        assert_eq!(r.uuids, vec!["zzzzz-dz642-000000000000001".to_string()]);
        assert!(r.broken);
        assert!(r.stale);
    }

    #[test]
    fn other_commands_are_exact() {
        assert_eq!(
            kill_command("crunch-run", "admin", "u1"),
            "sudo crunch-run --kill 15 u1"
        );
        assert_eq!(list_command("crunch-run", "root"), "crunch-run --list");
        assert_eq!(
            list_command_with_prices("crunch-run", "root"),
            "crunch-run --list --stdin-prices"
        );
        assert_eq!(
            list_command_with_prices("/var/lib/arvados/crunch-run~abc", "admin"),
            "sudo /var/lib/arvados/crunch-run~abc --list --stdin-prices"
        );
        assert_eq!(md5_command("/d/crunch-run~x"), "md5sum /d/crunch-run~x");
        assert_eq!(md5_expected("/d/c", "ab"), "ab  /d/c\n");
        assert_eq!(
            init_command("abc", "echo hi"),
            "umask 0177 && echo -n \"abc\" >/var/run/arvados-instance-secret\necho hi"
        );
        assert_eq!(
            RunnerSpec::deployed("/tmp/d/", "ff").command,
            "/tmp/d/crunch-run~ff"
        );
    }
}
