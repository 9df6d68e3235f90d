//! Test helpers: a throwaway OpenSSH `sshd` on 127.0.0.1 (crates.md §3.1) and scratch
//! directories.
//!
//! Each [`Sshd`] owns a scratch directory with its host key, the client's authorized key and a
//! `ForceCommand` wrapper. The wrapper rewrites `/var/run/arvados-instance-secret` to a file in
//! the scratch directory, so the instance-secret check runs its real command without touching
//! the host's `/var/run`. Dropping an [`Sshd`] kills the daemon and every process it started,
//! then removes the directory.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the Debian package `openssh-server` installs the daemon.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A scratch directory removed on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new empty directory under the system temp dir, unique to this process and call.
    pub fn new(label: &str) -> ScratchDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("adc-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a scratch directory");
        ScratchDir { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `ssh-keygen` to make an unencrypted key pair at `path` (and `path.pub`).
pub fn keygen(path: &Path, args: &[&str]) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-f"])
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen (Debian package openssh-client)");
    assert!(status.success(), "ssh-keygen {args:?} failed: {status}");
}

/// A free TCP port on 127.0.0.1 (free when this returns; tests accept the small race).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// A running OpenSSH daemon on 127.0.0.1.
pub struct Sshd {
    dir: ScratchDir,
    port: u16,
    child: Option<Child>,
    generation: u32,
}

impl Sshd {
    /// Starts sshd at a free port with a fresh ed25519 host key, authorising the public key
    /// in `authorized_key` (one `authorized_keys` line).
    pub fn start(authorized_key: &str) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: the SSH tests need OpenSSH's server. Run scripts/test (it \
             installs the test dependencies) or `apt-get install openssh-server`."
        );
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd's privsep dir)");
        let dir = ScratchDir::new("sshd");
        std::fs::write(dir.path().join("authorized_keys"), authorized_key)
            .expect("write authorized_keys");
        let wrapper = dir.path().join("wrap.sh");
        let secret = dir.path().join("instance-secret");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\ncmd=$(printf '%s' \"$SSH_ORIGINAL_COMMAND\" | sed 's#/var/run/arvados-instance-secret#{}#g')\nexec /bin/sh -c \"$cmd\"\n",
                secret.display()
            ),
        )
        .expect("write the command wrapper");
        let chmod = Command::new("chmod")
            .arg("0755")
            .arg(&wrapper)
            .status()
            .expect("chmod");
        assert!(chmod.success());
        let mut s = Sshd {
            dir,
            port: free_port(),
            child: None,
            generation: 0,
        };
        s.restart_with_new_host_key();
        s
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sets what `cat /var/run/arvados-instance-secret` prints through this daemon.
    pub fn set_instance_secret(&self, secret: &str) {
        std::fs::write(self.dir.path().join("instance-secret"), secret)
            .expect("write the instance secret");
    }

    /// The public host key line currently in use.
    pub fn host_public_key(&self) -> String {
        std::fs::read_to_string(self.host_key_path().with_extension("pub"))
            .expect("read the host public key")
    }

    fn host_key_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("host_ed25519_key_{}", self.generation))
    }

    /// Stops the daemon and every session it started.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.wait();
        }
    }

    /// Stops the daemon (and its sessions) and starts it again on the same port with a new
    /// host key.
    pub fn restart_with_new_host_key(&mut self) {
        self.stop();
        self.generation += 1;
        let host_key = self.host_key_path();
        keygen(&host_key, &["-t", "ed25519"]);
        let d = self.dir.path();
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nAcceptEnv TESTVAR\nForceCommand {d}/wrap.sh\nLogLevel VERBOSE\n",
                port = self.port,
                hk = host_key.display(),
                d = d.display(),
            ),
        )
        .expect("write sshd_config");
        let log = std::fs::File::create(d.join(format!("sshd.{}.log", self.generation)))
            .expect("create the sshd log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        // Wait until it accepts connections (generous: a loaded CI machine is slow).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(d.join(format!("sshd.{}.log", self.generation)))
                    .unwrap_or_default();
                panic!("sshd exited at start ({status}); its log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on port {} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The parent PID of each process, from /proc.
fn parents() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain spaces; fields follow the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            out.push((pid, ppid));
        }
    }
    out
}

/// SIGKILLs `root` and all its descendants.
pub fn kill_tree(root: u32) {
    let table = parents();
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(table.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    kill_pids(&all);
}

/// SIGKILLs the given processes (errors ignored: some may be gone).
pub fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-9")
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(Stdio::null())
        .status();
}

/// The PIDs of processes whose argv is exactly `argv`.
pub fn pids_with_argv(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want) {
            out.push(pid);
        }
    }
    out
}
