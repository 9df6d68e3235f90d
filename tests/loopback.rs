//! The loopback driver end to end: instances are in-process SSH servers on 127.0.0.1, reached
//! through the real SSH executor with host-key verification (reference-workers.md §6.4).

#![cfg(feature = "runtime")]

#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arvados_dispatch_cloud::cloud::loopback::{Loopback, LoopbackParams, QUOTA_MESSAGE};
use arvados_dispatch_cloud::cloud::{
    CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet, InstanceVerifier, ssh_target,
};
use arvados_dispatch_cloud::core::command::ExecErrorKind;
use arvados_dispatch_cloud::core::types::InstanceType;
use arvados_dispatch_cloud::ssh::{Executor, ExecutorConfig, SshError, Target};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use sshd::ScratchDir;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

fn later() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("the test hung for 120 s")
}

/// A fixed test client key (the seed byte makes different keys).
fn client_key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

fn params(dir: &Path, max_instances: usize) -> LoopbackParams {
    LoopbackParams {
        max_instances,
        state_file: dir.join("state").join("loopback.json"),
        broken_flag_file: None,
    }
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn request(key: &PrivateKey, tag_pairs: &[(&str, &str)]) -> CreateRequest {
    CreateRequest {
        instance_type: Arc::new(InstanceType {
            name: "tiny".into(),
            provider_type: "loopback-tiny".into(),
            vcpus: 1,
            ram: 1 << 30,
            ..Default::default()
        }),
        image_id: String::new(),
        tags: tags(tag_pairs),
        init_command: String::new(),
        public_key: Some(key.public_key().clone()),
    }
}

fn executor(key: &PrivateKey, set: Arc<dyn InstanceSet>, inst: &InstanceInfo) -> Executor {
    Executor::new(
        ExecutorConfig::new(key.clone(), "22"),
        ssh_target(set, inst, "", None),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_survives_a_driver_restart() {
    let dir = ScratchDir::new("loopback-life");
    let key = client_key(1);
    let filter = tags(&[("ArvadosInstanceSetID", "zzzzz-test")]);
    bounded(async {
        let first: Arc<Loopback> =
            Arc::new(Loopback::new(params(dir.path(), 1)).await.expect("driver"));
        assert!(first.list(&filter).await.expect("list").is_empty());

        let inst = first
            .create(request(
                &key,
                &[
                    ("ArvadosInstanceSetID", "zzzzz-test"),
                    ("ArvadosIdleBehavior", "run"),
                ],
            ))
            .await
            .expect("create");
        assert!(inst.address.starts_with("127.0.0.1:"), "{}", inst.address);
        assert_eq!(inst.provider_type, "loopback-tiny");
        let listed = first.list(&filter).await.expect("list");
        assert_eq!(listed, vec![inst.clone()]);
        // Another dispatcher's filter does not see it.
        assert!(
            first
                .list(&tags(&[("ArvadosInstanceSetID", "other")]))
                .await
                .expect("list")
                .is_empty()
        );

        let connects = Arc::new(AtomicUsize::new(0));
        let hook_count = connects.clone();
        let hook: arvados_dispatch_cloud::cloud::ConnectHook = Arc::new(move |id: &str| {
            assert_eq!(id, "loopback-tiny");
            hook_count.fetch_add(1, Ordering::SeqCst);
        });
        let exr = Executor::new(
            ExecutorConfig::new(key.clone(), "22"),
            ssh_target(first.clone(), &inst, "", Some(hook)),
        );
        let out = exr.exec("echo hi", b"", &[], later()).await.expect("exec");
        assert_eq!(out.stdout, b"hi\n");
        exr.exec("true", b"", &[], later()).await.expect("exec 2");
        assert_eq!(
            connects.load(Ordering::SeqCst),
            1,
            "one connection, one report"
        );
        let verified = exr.verified_host_key().expect("verified host key");
        assert_eq!(
            Some(verified.key_data().clone()),
            first
                .host_public_key(&inst.id)
                .await
                .map(|k| k.key_data().clone())
        );

        let mut new_tags = inst.tags.clone();
        new_tags.insert("ArvadosIdleBehavior".into(), "hold".into());
        first
            .set_tags(&inst.id, new_tags.clone())
            .await
            .expect("set_tags");
        assert_eq!(first.list(&filter).await.expect("list")[0].tags, new_tags);

        // The dispatcher restarts: a new driver recovers the instance from the state file.
        first.stop().await;
        drop(first);
        let second: Arc<Loopback> = Arc::new(
            Loopback::new(params(dir.path(), 1))
                .await
                .expect("driver 2"),
        );
        let listed = second.list(&filter).await.expect("list 2");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, inst.id);
        assert_eq!(listed[0].tags, new_tags);
        assert_eq!(listed[0].address, inst.address, "same port when it is free");

        let exr2 = executor(&key, second.clone(), &listed[0]);
        let out = exr2
            .exec("echo again", b"", &[], later())
            .await
            .expect("exec on the recovered instance");
        assert_eq!(out.stdout, b"again\n");
        assert_eq!(
            exr2.verified_host_key().map(|k| k.key_data().clone()),
            Some(verified.key_data().clone()),
            "same host key after the restart"
        );

        second.destroy(&inst.id).await.expect("destroy");
        assert!(second.list(&filter).await.expect("list").is_empty());
        let e = second.destroy(&inst.id).await.unwrap_err();
        assert_eq!(e.kind, CloudErrorKind::NotFound);
        // Its server is gone.
        let e = exr2.exec("true", b"", &[], later()).await.unwrap_err();
        assert!(
            matches!(e, SshError::Connect { .. } | SshError::Session { .. }),
            "{e:?}"
        );

        // A third driver finds nothing.
        second.stop().await;
        let third = Loopback::new(params(dir.path(), 1))
            .await
            .expect("driver 3");
        assert!(third.list(&BTreeMap::new()).await.expect("list").is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_past_max_instances() {
    let dir = ScratchDir::new("loopback-quota");
    let key = client_key(2);
    bounded(async {
        let set = Loopback::new(params(dir.path(), 2)).await.expect("driver");
        let a = set.create(request(&key, &[])).await.expect("create 1");
        let b = set.create(request(&key, &[])).await.expect("create 2");
        assert_ne!(a.id, b.id);
        assert_ne!(a.address, b.address);
        let e = set.create(request(&key, &[])).await.unwrap_err();
        assert_eq!(e.kind, CloudErrorKind::Quota);
        assert_eq!(e.message, QUOTA_MESSAGE);
        assert_eq!(e.message, "loopback driver is always at quota");
        set.destroy(&a.id).await.expect("destroy");
        set.create(request(&key, &[])).await.expect("room again");
        set.stop().await;

        // The default is one instance.
        let dir2 = ScratchDir::new("loopback-quota1");
        let p = LoopbackParams::from_driver_parameters(&serde_json::json!({
            "StateFile": dir2.path().join("s.json").to_str().expect("utf-8 path"),
        }))
        .expect("params");
        assert_eq!(p.max_instances, 1);
        let one = Loopback::new(p).await.expect("driver");
        one.create(request(&key, &[])).await.expect("create");
        let e = one.create(request(&key, &[])).await.unwrap_err();
        assert_eq!(e.kind, CloudErrorKind::Quota);
        one.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_stdin_env_and_sudo() {
    let dir = ScratchDir::new("loopback-exec");
    let key = client_key(3);
    bounded(async {
        let set: Arc<Loopback> =
            Arc::new(Loopback::new(params(dir.path(), 1)).await.expect("driver"));
        let inst = set.create(request(&key, &[])).await.expect("create");
        let exr = executor(&key, set.clone(), &inst);
        let env = vec![("TESTVAR".to_string(), "tv".to_string())];
        let out = exr
            .run(
                "sudo sh -c 'cat; echo \"$TESTVAR\"; echo oops >&2; exit 3'",
                b"stdin text\n",
                &env,
                later(),
            )
            .await
            .expect("run");
        assert_eq!(out.exit_status, 3);
        assert_eq!(out.stdout, b"stdin text\ntv\n");
        assert_eq!(out.stderr, b"oops\n");
        let e = exr.exec("exit 2", b"", &[], later()).await.unwrap_err();
        assert!(matches!(e, SshError::Exit { status: 2, .. }), "{e:?}");
        assert_eq!(e.kind(), ExecErrorKind::Exit(2));
        // A command killed by a signal reports status 1, as Go's loopback does.
        let out = exr.run("kill -9 $$", b"", &[], later()).await.expect("run");
        assert_eq!(out.exit_status, 1);
        // Large stdin arrives complete.
        let big: Vec<u8> = (0..2_500_000u32).map(|i| (i % 241) as u8).collect();
        let out = exr.exec("wc -c", &big, &[], later()).await.expect("wc");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2500000");
        // The command runs in its own session: the shell's session ID (field 6 of its
        // /proc stat line; "sh" has no space in its name) is its own PID.
        let out = exr
            .exec("cat /proc/$$/stat", b"", &[], later())
            .await
            .expect("read the shell's stat");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let f: Vec<&str> = text.split_whitespace().collect();
        assert!(f.len() > 6, "{text}");
        assert_eq!(f[5], f[0], "the shell leads its own session: {text}");
        set.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_command_is_killed_at_the_deadline() {
    let dir = ScratchDir::new("loopback-hang");
    let key = client_key(4);
    let pidfile = dir.path().join("pid");
    bounded(async {
        let set: Arc<Loopback> =
            Arc::new(Loopback::new(params(dir.path(), 1)).await.expect("driver"));
        let inst = set.create(request(&key, &[])).await.expect("create");
        let exr = executor(&key, set.clone(), &inst);
        let cmd = format!("echo $$ > {}; sleep 600", pidfile.display());
        let e = exr
            .exec(&cmd, b"", &[], Instant::now() + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, SshError::Timeout { .. }), "{e:?}");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .expect("the command wrote its PID")
            .trim()
            .parse()
            .expect("a PID");
        // The server kills the command's process group once the channel closes.
        let gone = async {
            while Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), gone)
            .await
            .expect("the hanging command was not killed within 30 s");
        // The connection still serves the next command.
        let out = exr
            .exec("echo next", b"", &[], later())
            .await
            .expect("exec");
        assert_eq!(out.stdout, b"next\n");
        set.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_and_wrong_key_are_refused() {
    let dir = ScratchDir::new("loopback-keys");
    let key = client_key(5);
    bounded(async {
        let set: Arc<Loopback> =
            Arc::new(Loopback::new(params(dir.path(), 2)).await.expect("driver"));
        let a = set.create(request(&key, &[])).await.expect("create a");
        let b = set.create(request(&key, &[])).await.expect("create b");

        // Instance a's address with instance b's verifier: a's key is not b's.
        let exr = Executor::new(
            ExecutorConfig::new(key.clone(), "22"),
            Target {
                address: a.address.clone(),
                remote_user: a.remote_user.clone(),
                verifier: Arc::new(InstanceVerifier::new(set.clone(), b.id.clone(), "")),
            },
        );
        let e = exr.exec("true", b"", &[], later()).await.unwrap_err();
        assert!(
            matches!(&e, SshError::HostKey { reason, .. } if reason == "host key mismatch"),
            "{e:?}"
        );

        // A client key the instance was not created with.
        let other = client_key(6);
        let exr = executor(&other, set.clone(), &a);
        let e = exr.exec("true", b"", &[], later()).await.unwrap_err();
        assert!(matches!(e, SshError::Auth { .. }), "{e:?}");
        set.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_flag_file_is_removed_at_create() {
    let dir = ScratchDir::new("loopback-broken");
    let key = client_key(7);
    let flag = dir.path().join("crunch-run-broken");
    std::fs::write(&flag, "").expect("write flag");
    bounded(async {
        let mut p = params(dir.path(), 1);
        p.broken_flag_file = Some(flag.clone());
        let set = Loopback::new(p).await.expect("driver");
        set.create(request(&key, &[])).await.expect("create");
        assert!(!flag.exists(), "the broken flag was not removed");
        set.stop().await;
    })
    .await;
}

#[test]
fn driver_parameters() {
    let p = LoopbackParams::from_driver_parameters(&serde_json::json!({
        "MaxInstances": 3, "StateFile": "/x/s.json", "BrokenFlagFile": "/x/broken", "Other": 1
    }))
    .expect("params");
    assert_eq!(p.max_instances, 3);
    assert_eq!(p.state_file, Path::new("/x/s.json"));
    assert_eq!(p.broken_flag_file.as_deref(), Some(Path::new("/x/broken")));
    let d = LoopbackParams::from_driver_parameters(&serde_json::Value::Null).expect("defaults");
    assert_eq!(d, LoopbackParams::default());
    assert!(d.broken_flag_file.is_none());
    let e = LoopbackParams::from_driver_parameters(&serde_json::json!({"MaxInstances": -1}))
        .unwrap_err();
    assert!(e.to_string().contains("MaxInstances"), "{e}");
    let e =
        LoopbackParams::from_driver_parameters(&serde_json::json!({"StateFile": 5})).unwrap_err();
    assert!(e.to_string().contains("StateFile"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_file_is_an_error() {
    let dir = ScratchDir::new("loopback-corrupt");
    let p = params(dir.path(), 1);
    std::fs::create_dir_all(p.state_file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&p.state_file, "{not json").expect("write");
    let e = Loopback::new(p.clone()).await.unwrap_err();
    assert!(e.to_string().contains("loopback.json"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_instance_moves_when_its_port_is_taken() {
    let dir = ScratchDir::new("loopback-port");
    let key = client_key(8);
    bounded(async {
        let first = Loopback::new(params(dir.path(), 1)).await.expect("driver");
        let inst = first.create(request(&key, &[])).await.expect("create");
        first.stop().await;
        drop(first);
        // Someone else now holds the port.
        let squatter = std::net::TcpListener::bind(&inst.address).expect("take the port");
        let second: Arc<Loopback> = Arc::new(
            Loopback::new(params(dir.path(), 1))
                .await
                .expect("driver 2"),
        );
        let listed = second.list(&BTreeMap::new()).await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, inst.id);
        assert_ne!(listed[0].address, inst.address, "a new port");
        let exr = executor(&key, second.clone(), &listed[0]);
        let out = exr
            .exec("echo moved", b"", &[], later())
            .await
            .expect("exec");
        assert_eq!(out.stdout, b"moved\n");
        second.stop().await;
        drop(second);
        drop(squatter);
        // The new port was saved.
        let third = Loopback::new(params(dir.path(), 1))
            .await
            .expect("driver 3");
        let listed3 = third.list(&BTreeMap::new()).await.expect("list");
        assert_eq!(listed3[0].address, listed[0].address);
        third.stop().await;
    })
    .await;
}
