//! The SSH executor against OpenSSH's real `sshd` on 127.0.0.1 (reference-workers.md §5.4).
//!
//! Each test starts its own daemon at a free port with a throwaway host key; dropping it kills
//! the daemon and its sessions. The instance secret file is redirected into the daemon's scratch
//! directory by a `ForceCommand` wrapper (see tests/support/sshd.rs).

#![cfg(feature = "runtime")]

#[path = "support/sshd.rs"]
mod sshd;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arvados_dispatch_cloud::core::command::ExecErrorKind;
use arvados_dispatch_cloud::ssh::{
    AcceptAnyHostKey, BoxFuture, Executor, ExecutorConfig, HostKeyError, HostKeyVerifier,
    InstanceSecretVerifier, SshError, UnverifiedConnection, load_private_key, to_core,
};
use russh::keys::PublicKey;
use sshd::{ScratchDir, Sshd, keygen};
use tokio::time::Instant;

/// A deadline far enough away that only a hang reaches it.
fn later() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// A client key pair; returns the config and the `authorized_keys` line.
fn client_key(dir: &ScratchDir, args: &[&str]) -> (ExecutorConfig, String) {
    let path = dir.path().join("client_key");
    keygen(&path, args);
    let key = load_private_key(&format!("file://{}", path.display())).expect("load client key");
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read public key");
    (ExecutorConfig::new(key, "22"), public)
}

fn executor(
    config: &ExecutorConfig,
    address: &str,
    verifier: Arc<dyn HostKeyVerifier>,
) -> Executor {
    Executor::new(
        config.clone(),
        arvados_dispatch_cloud::ssh::Target {
            address: address.to_string(),
            remote_user: "root".into(),
            verifier,
        },
    )
}

/// Counts verifications and delegates to an inner verifier.
struct Counting {
    inner: Arc<dyn HostKeyVerifier>,
    calls: AtomicUsize,
}

impl Counting {
    fn new(inner: Arc<dyn HostKeyVerifier>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            calls: AtomicUsize::new(0),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl HostKeyVerifier for Counting {
    fn verify_host_key<'a>(
        &'a self,
        key: &'a PublicKey,
        conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.verify_host_key(key, conn)
    }
}

/// Runs a future under a generous overall limit so that a hang fails the test.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test hung for 120 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_output_stdin_and_env() {
    let dir = ScratchDir::new("ssh-exec");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);
    let sshd = Sshd::start(&public);
    let exr = executor(&config, &sshd.address(), Arc::new(AcceptAnyHostKey));
    bounded(async {
        for code in [0u32, 1, 2] {
            let cmd = format!("cat; echo out; echo err >&2; echo \"$TESTVAR\"; exit {code}");
            let env = vec![("TESTVAR".to_string(), format!("val{code}"))];
            let stdin = format!("in{code}\n");
            let out = exr
                .run(&cmd, stdin.as_bytes(), &env, later())
                .await
                .expect("run");
            assert_eq!(out.exit_status, code);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("in{code}\nout\nval{code}\n")
            );
            assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

            let r = exr.exec(&cmd, stdin.as_bytes(), &env, later()).await;
            if code == 0 {
                assert!(r.is_ok(), "{r:?}");
            } else {
                match &r {
                    Err(SshError::Exit {
                        status,
                        stdout,
                        stderr,
                    }) => {
                        assert_eq!(*status, code);
                        assert_eq!(stdout, format!("in{code}\nout\nval{code}\n").as_bytes());
                        assert_eq!(stderr, b"err\n");
                    }
                    other => panic!("want an exit error, got {other:?}"),
                }
                let core = to_core(r).expect_err("non-zero exit");
                assert_eq!(core.kind, ExecErrorKind::Exit(code as i32));
                assert_eq!(core.stderr, "err\n");
            }
        }
        // A large stdin (a runner binary, say) goes through in full.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = exr.exec("wc -c", &big, &[], later()).await.expect("wc");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000000");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_pem_key_authenticates() {
    let dir = ScratchDir::new("ssh-rsa");
    let (config, public) = client_key(&dir, &["-t", "rsa", "-b", "2048", "-m", "PEM"]);
    let sshd = Sshd::start(&public);
    let exr = executor(&config, &sshd.address(), Arc::new(AcceptAnyHostKey));
    let out = bounded(exr.exec("echo hi", b"", &[], later()))
        .await
        .expect("exec with an RSA PEM key");
    assert_eq!(out.stdout, b"hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_classified() {
    let dir = ScratchDir::new("ssh-fail");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);

    // Nothing listens on a port that was just freed.
    let closed = format!("127.0.0.1:{}", sshd::free_port());
    let exr = executor(&config, &closed, Arc::new(AcceptAnyHostKey));
    let e = bounded(exr.exec("true", b"", &[], later()))
        .await
        .unwrap_err();
    assert!(matches!(e, SshError::Connect { .. }), "{e:?}");
    assert_eq!(e.kind(), ExecErrorKind::Connect);

    // No address yet.
    let exr = executor(&config, "", Arc::new(AcceptAnyHostKey));
    let e = bounded(exr.exec("true", b"", &[], later()))
        .await
        .unwrap_err();
    assert_eq!(e, SshError::NoAddress);
    assert_eq!(e.to_string(), "instance has no address");

    // A key the server does not know.
    let sshd = Sshd::start(&public);
    let other = ScratchDir::new("ssh-other");
    let (wrong, _) = client_key(&other, &["-t", "ed25519"]);
    let exr = executor(&wrong, &sshd.address(), Arc::new(AcceptAnyHostKey));
    let e = bounded(exr.exec("true", b"", &[], later()))
        .await
        .unwrap_err();
    assert!(matches!(e, SshError::Auth { .. }), "{e:?}");
    assert_eq!(e.kind(), ExecErrorKind::Auth);

    // Port from the config when the address has none.
    let config_port = ExecutorConfig::new(
        load_private_key(&format!(
            "file://{}",
            dir.path().join("client_key").display()
        ))
        .expect("key"),
        sshd.port().to_string(),
    );
    let exr = executor(&config_port, "127.0.0.1", Arc::new(AcceptAnyHostKey));
    bounded(exr.exec("true", b"", &[], later()))
        .await
        .expect("default port from the config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_command_times_out_at_the_deadline() {
    let dir = ScratchDir::new("ssh-hang");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);
    let sshd = Sshd::start(&public);
    let exr = executor(&config, &sshd.address(), Arc::new(AcceptAnyHostKey));
    // A unique argument lets the test find (and clean up) exactly its own sleep.
    let arg = format!("600.{}{}", std::process::id(), sshd.port());
    let e = bounded(exr.exec(
        &format!("sleep {arg}"),
        b"",
        &[],
        Instant::now() + Duration::from_secs(2),
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, SshError::Timeout { .. }), "{e:?}");
    assert_eq!(e.kind(), ExecErrorKind::Timeout);
    // The connection is still usable for the next command.
    let out = bounded(exr.exec("echo after", b"", &[], later()))
        .await
        .expect("exec after a timeout");
    assert_eq!(out.stdout, b"after\n");
    sshd::kill_pids(&sshd::pids_with_argv(&["sleep", &arg]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_secret_good_and_bad() {
    let dir = ScratchDir::new("ssh-secret");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);
    let sshd = Sshd::start(&public);
    let secret = "0123456789abcdef0123456789abcdef01234567";
    sshd.set_instance_secret(secret);

    let good = Counting::new(Arc::new(InstanceSecretVerifier::new(secret)));
    let exr = executor(&config, &sshd.address(), good.clone());
    bounded(async {
        let out = exr.exec("echo ok", b"", &[], later()).await.expect("exec");
        assert_eq!(out.stdout, b"ok\n");
        assert_eq!(good.calls(), 1);
        assert!(exr.verified_host_key().is_some());
        // A reconnect that presents the same key skips verification.
        exr.close().await;
        exr.exec("true", b"", &[], later())
            .await
            .expect("exec after close");
        assert_eq!(good.calls(), 1);
    })
    .await;

    // A secret with a trailing newline is not the secret.
    sshd.set_instance_secret(&format!("{secret}\n"));
    let bad = Counting::new(Arc::new(InstanceSecretVerifier::new(secret)));
    let exr = executor(&config, &sshd.address(), bad.clone());
    let marker = dir.path().join("ran");
    let e = bounded(exr.exec(&format!("touch {}", marker.display()), b"", &[], later()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SshError::HostKey { reason, .. } if reason == "bad instance secret"),
        "{e:?}"
    );
    assert_eq!(e.kind(), ExecErrorKind::HostKey);
    assert!(exr.verified_host_key().is_none());
    assert!(
        !marker.exists(),
        "the command ran although the host key was refused"
    );
    assert_eq!(bad.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_host_key_is_verified_again() {
    let dir = ScratchDir::new("ssh-rekey");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);
    let mut sshd = Sshd::start(&public);
    let secret = "aaaaaaaaaabbbbbbbbbbccccccccccdddddddddd";
    sshd.set_instance_secret(secret);
    let counting = Counting::new(Arc::new(InstanceSecretVerifier::new(secret)));
    let exr = executor(&config, &sshd.address(), counting.clone());

    bounded(exr.exec("true", b"", &[], later()))
        .await
        .expect("first exec");
    assert_eq!(counting.calls(), 1);
    let first = exr.verified_host_key().expect("a verified key");

    // Same port, new host key, same secret: the executor reconnects and verifies again.
    sshd.restart_with_new_host_key();
    let out = bounded(exr.exec("echo again", b"", &[], later()))
        .await
        .expect("exec after the host key changed");
    assert_eq!(out.stdout, b"again\n");
    assert_eq!(counting.calls(), 2);
    let second = exr.verified_host_key().expect("a verified key");
    assert_ne!(first.key_data(), second.key_data());
    let served = PublicKey::from_openssh(sshd.host_public_key().trim()).expect("host key");
    assert_eq!(second.key_data(), served.key_data());

    // New host key and a wrong secret: refused, and the old key stays the verified one.
    sshd.set_instance_secret("not the secret");
    sshd.restart_with_new_host_key();
    let e = bounded(exr.exec("echo never", b"", &[], later()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SshError::HostKey { reason, .. } if reason == "bad instance secret"),
        "{e:?}"
    );
    assert_eq!(counting.calls(), 3);
    assert_eq!(
        exr.verified_host_key().map(|k| k.key_data().clone()),
        Some(second.key_data().clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_share_one_dial() {
    let dir = ScratchDir::new("ssh-conc");
    let (config, public) = client_key(&dir, &["-t", "ed25519"]);
    let sshd = Sshd::start(&public);
    let secret = "1111111111222222222233333333334444444444";
    sshd.set_instance_secret(secret);
    let counting = Counting::new(Arc::new(InstanceSecretVerifier::new(secret)));
    let exr = executor(&config, &sshd.address(), counting.clone());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let exr = exr.clone();
            tokio::spawn(async move {
                exr.exec(&format!("sleep 0.2; echo {i}"), b"", &[], later())
                    .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = bounded(t).await.expect("join").expect("exec");
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }
    assert_eq!(counting.calls(), 1, "one dial, one verification");
}
