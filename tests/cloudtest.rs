//! `arvados-dispatch-cloud cloudtest` (reference-workers.md §6.5), running the built binary:
//!
//! * with the loopback driver, the whole sequence including the SSH boot probe against the
//!   loopback instance (an in-process SSH server on 127.0.0.1, host key checked by the driver);
//!   a failing boot probe, a failing `-command`, an instance left over from an earlier test
//!   (with and without `-destroy-existing`), one run per listed subnet, and an unknown type;
//! * with the EC2 driver against moto's EC2 emulator (`moto_server`, PyPI `moto[server]`,
//!   installed by scripts/test) on 127.0.0.1 with `-skip-boot-probe`; nothing connects to the
//!   addresses moto hands out.
#![cfg(feature = "runtime")]

#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arvados_dispatch_cloud::cloud::loopback::{Loopback, LoopbackParams};
use arvados_dispatch_cloud::cloud::{CreateRequest, InstanceSet};
use arvados_dispatch_cloud::cloudtest::DEFAULT_INSTANCE_SET_ID;
use arvados_dispatch_cloud::core::types::InstanceType;
use serde_json::Value;
use sshd::{ScratchDir, keygen};

const BIN: &str = env!("CARGO_BIN_EXE_arvados-dispatch-cloud");
const ROOT_TOKEN: &str = "cloudtestroottoken0123456789abcdefghijklmnop";
const MGMT_TOKEN: &str = "cloudtestmgmttoken0123456789abcdefghijklmnop";
/// A bound on one cloudtest process, so that a hang fails the test instead of blocking it.
const PROCESS_LIMIT: Duration = Duration::from_secs(300);

/// What a finished cloudtest process left.
struct Run {
    status: ExitStatus,
    pid: u32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn output(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs the binary with `args` (and `stdin` as its standard input), killing it after
/// [`PROCESS_LIMIT`].
fn run_bin(args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .env("ARVADOS_DISPATCH_LOG", "info")
        .env_remove("ARVADOS_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arvados-dispatch-cloud");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin");
    // A process that exits at once (a setup error) may not read it.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PROCESS_LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!("cloudtest still running after {PROCESS_LIMIT:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        status,
        pid,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A scratch directory with a dispatcher key pair (`dispatch_key`).
struct Setup {
    dir: ScratchDir,
}

impl Setup {
    fn new(label: &str) -> Setup {
        Setup::with_key(label, &["-t", "ed25519"])
    }

    /// With a key made by `ssh-keygen <keygen_args>`.
    fn with_key(label: &str, keygen_args: &[&str]) -> Setup {
        let dir = ScratchDir::new(label);
        keygen(&dir.path().join("dispatch_key"), keygen_args);
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state_file(&self) -> PathBuf {
        self.path("loopback-state.json")
    }

    /// The private key's base64 body lines, which must never be printed.
    fn key_material(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("dispatch_key"))
            .expect("private key")
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
            .map(str::to_string)
            .collect()
    }

    /// Writes a cluster config with `driver`, `driver_params` (YAML lines at the
    /// DriverParameters indentation) and extra CloudVMs lines; returns its path.
    fn config(&self, driver: &str, driver_params: &str, cloud_vms: &str) -> PathBuf {
        let path = self.path("config.yml");
        std::fs::write(
            &path,
            format!(
                r#"Clusters:
  zzzzz:
    SystemRootToken: {ROOT_TOKEN}
    ManagementToken: {MGMT_TOKEN}
    Containers:
      DispatchPrivateKey: file://{key}
      CloudVMs:
        Driver: {driver}
        DriverParameters:
{driver_params}
        SyncInterval: 1s
        ProbeInterval: 1s
        ResourceTags:
          Owner: cloudtest-suite
{cloud_vms}
    InstanceTypes:
      small:
        ProviderType: {small}
        VCPUs: 2
        RAM: 4GiB
        Price: 0.1
{large}"#,
                key = self.path("dispatch_key").display(),
                small = if driver == "ec2" {
                    "t3.small"
                } else {
                    "loopback-small"
                },
                // The loopback driver takes exactly one type.
                large = if driver == "ec2" {
                    "      large:\n        ProviderType: m5.2xlarge\n        VCPUs: 8\n        RAM: 16GiB\n        Price: 0.4\n"
                } else {
                    ""
                },
            ),
        )
        .expect("write config");
        path
    }

    /// A loopback config with `BootProbeCommand` = `probe` and `TimeoutBooting` = `booting`.
    fn loopback_config(&self, probe: &str, booting: &str, extra_params: &str) -> PathBuf {
        self.config(
            "loopback",
            &format!(
                "          MaxInstances: 1\n          StateFile: {}\n{extra_params}",
                self.state_file().display()
            ),
            &format!(
                "        ImageID: loopback-image\n        BootProbeCommand: {probe:?}\n        TimeoutBooting: {booting}\n"
            ),
        )
    }

    /// The instances in the loopback state file.
    fn loopback_instances(&self) -> Vec<Value> {
        let text = match std::fs::read_to_string(self.state_file()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("read the state file: {e}"),
        };
        let v: Value = serde_json::from_str(&text).expect("state file JSON");
        v["instances"].as_array().cloned().unwrap_or_default()
    }

    /// Fails if a secret of the config or the key appears in `run`'s output.
    fn assert_no_secrets(&self, run: &Run, more: &[&str]) {
        let all = format!("{}{}", run.stdout, run.stderr);
        let mut secrets: Vec<String> = vec![ROOT_TOKEN.into(), MGMT_TOKEN.into()];
        secrets.extend(self.key_material());
        secrets.extend(more.iter().map(|s| s.to_string()));
        for s in secrets {
            assert!(
                !all.contains(&s),
                "a secret appears in the output:\n{}",
                run.output()
            );
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The `ssh -p<port> <user>@<host>` hint for host 127.0.0.1 is in `log`.
fn has_login_hint(log: &str) -> bool {
    log.split("ssh -p").skip(1).any(|rest| {
        let (port, after) = rest.split_at(rest.find(' ').unwrap_or(rest.len()));
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && after
                .split_whitespace()
                .next()
                .is_some_and(|uh| uh.contains('@') && uh.contains("127.0.0.1"))
    })
}

#[test]
fn loopback_full_sequence_passes() {
    let s = Setup::new("cloudtest-ok");
    let config = s.loopback_config("true", "60s", "");
    let copy = s.path("state-seen-by-command.json");
    // The command runs on the loopback "instance" (this host) while the instance exists: it
    // copies the cloud's view of the instance, tags included, for the checks below.
    let command = format!("cp {} {}", path_str(&s.state_file()), path_str(&copy));
    // Go-style single-dash flags, as operators type them for arvados-server.
    let run = run_bin(
        &[
            "cloudtest",
            "-config",
            path_str(&config),
            "-command",
            &command,
            "-pause-before-destroy",
        ],
        "\n",
    );
    assert!(run.status.success(), "{}", run.output());
    let log = &run.stderr;
    for want in [
        "creating instance",
        "created instance",
        "found our instance in the list",
        "all expected tags are present",
        "boot probe succeeded",
        "remote command succeeded",
        "waiting for operator to press Enter",
        "instance no longer appears in the list",
        "cloudtest passed",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{}", run.output());
    }
    assert!(has_login_hint(log), "no login hint:\n{}", run.output());

    // What the cloud had while the test ran: the shared tags, the InstanceSetID and a secret,
    // but neither InstanceType nor IdleBehavior.
    let seen: Value =
        serde_json::from_str(&std::fs::read_to_string(&copy).expect("the command ran"))
            .expect("copied state");
    let instances = seen["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{seen}");
    let tags = &instances[0]["tags"];
    assert_eq!(tags["ArvadosInstanceSetID"], DEFAULT_INSTANCE_SET_ID);
    assert_eq!(tags["Owner"], "cloudtest-suite");
    assert_eq!(tags["ArvadosCloudTestPID"], run.pid.to_string());
    assert_eq!(
        instances[0]["provider_type"], "loopback-small",
        "the cheapest type"
    );
    assert!(tags.get("ArvadosInstanceType").is_none(), "{tags}");
    assert!(tags.get("ArvadosIdleBehavior").is_none(), "{tags}");
    let secret = tags["ArvadosInstanceSecret"].as_str().expect("secret tag");
    assert_eq!(secret.len(), 40);
    s.assert_no_secrets(&run, &[secret]);

    // Destroyed: the cloud is empty again.
    assert!(s.loopback_instances().is_empty(), "{}", run.output());
}

#[test]
fn loopback_failing_boot_probe_fails_and_names_the_command() {
    let s = Setup::new("cloudtest-probe");
    let config = s.loopback_config("falsey", "3s", "");
    let run = run_bin(
        &[
            "cloudtest",
            "--config",
            path_str(&config),
            "--instance-type",
            "small",
        ],
        "",
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.output());
    let log = &run.stderr;
    assert!(
        log.contains("boot probe command \"falsey\" did not succeed"),
        "{}",
        run.output()
    );
    // The shell's own complaint about the command reaches the log.
    assert!(
        log.lines()
            .any(|l| l.contains("falsey") && l.contains("not found")),
        "{}",
        run.output()
    );
    assert!(log.contains("cloudtest FAILED"), "{}", run.output());
    // The instance is destroyed all the same.
    assert!(
        log.contains("instance no longer appears in the list"),
        "{}",
        run.output()
    );
    assert!(s.loopback_instances().is_empty());
    s.assert_no_secrets(&run, &[]);
}

#[test]
fn loopback_failing_command_fails() {
    let s = Setup::new("cloudtest-cmd");
    let config = s.loopback_config("true", "60s", "");
    let run = run_bin(
        &[
            "cloudtest",
            "--config",
            path_str(&config),
            "--command",
            "falsey",
        ],
        "",
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.output());
    let log = &run.stderr;
    assert!(log.contains("boot probe succeeded"), "{}", run.output());
    assert!(
        log.contains("command \"falsey\" failed"),
        "{}",
        run.output()
    );
    assert!(log.contains("cloudtest FAILED"), "{}", run.output());
    assert!(s.loopback_instances().is_empty());
}

/// Leaves a loopback instance tagged with the default test InstanceSetID in the state file.
fn leave_instance(s: &Setup) -> String {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let set = Loopback::new(LoopbackParams {
            max_instances: 1,
            state_file: s.state_file(),
            broken_flag_file: None,
        })
        .await
        .expect("loopback driver");
        let info = set
            .create(CreateRequest {
                instance_type: Arc::new(InstanceType {
                    name: "small".into(),
                    provider_type: "loopback-leftover".into(),
                    vcpus: 2,
                    ram: 4 << 30,
                    ..Default::default()
                }),
                image_id: String::new(),
                tags: BTreeMap::from([(
                    "ArvadosInstanceSetID".to_string(),
                    DEFAULT_INSTANCE_SET_ID.to_string(),
                )]),
                init_command: String::new(),
                public_key: None,
            })
            .await
            .expect("create");
        set.stop().await;
        info.id
    })
}

#[test]
fn loopback_existing_instance_needs_destroy_existing() {
    let s = Setup::new("cloudtest-existing");
    let leftover = leave_instance(&s);
    let config = s.loopback_config("true", "60s", "");

    let run = run_bin(&["cloudtest", "-config", path_str(&config)], "");
    assert_eq!(run.status.code(), Some(1), "{}", run.output());
    assert!(
        run.stderr
            .contains("found existing instance with our InstanceSetID"),
        "{}",
        run.output()
    );
    assert!(run.stderr.contains("-destroy-existing"), "{}", run.output());
    assert!(
        !run.stderr.contains("creating instance"),
        "{}",
        run.output()
    );
    let left: Vec<Value> = s.loopback_instances();
    assert_eq!(left.len(), 1, "the leftover is kept");
    assert_eq!(left[0]["id"], leftover);

    let run = run_bin(
        &[
            "cloudtest",
            "-config",
            path_str(&config),
            "-destroy-existing",
        ],
        "",
    );
    assert!(run.status.success(), "{}", run.output());
    assert!(
        run.stderr
            .contains("destroying existing instance with our InstanceSetID"),
        "{}",
        run.output()
    );
    assert!(run.stderr.contains("cloudtest passed"), "{}", run.output());
    assert!(s.loopback_instances().is_empty(), "{}", run.output());
}

#[test]
fn loopback_runs_once_per_subnet() {
    let s = Setup::new("cloudtest-subnets");
    // The loopback driver ignores SubnetID; cloudtest still runs once per listed subnet.
    let config = s.loopback_config(
        "true",
        "60s",
        "          SubnetID: [subnet-aaaa, subnet-bbbb]\n",
    );
    let run = run_bin(
        &[
            "cloudtest",
            "--config",
            path_str(&config),
            "--destroy-existing=true",
        ],
        "",
    );
    assert!(run.status.success(), "{}", run.output());
    let log = &run.stderr;
    assert!(
        log.contains("running tests using SubnetID[0] \"subnet-aaaa\""),
        "{log}"
    );
    assert!(
        log.contains("running tests using SubnetID[1] \"subnet-bbbb\""),
        "{log}"
    );
    assert_eq!(log.matches(": created instance").count(), 2, "{log}");
    assert_eq!(log.matches("boot probe succeeded").count(), 2, "{log}");
    assert!(s.loopback_instances().is_empty());
}

#[test]
fn unknown_instance_type_is_a_setup_error() {
    let s = Setup::new("cloudtest-type");
    let config = s.loopback_config("true", "60s", "");
    let run = run_bin(
        &[
            "cloudtest",
            "--config",
            path_str(&config),
            "--instance-type",
            "huge",
        ],
        "",
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.output());
    assert!(
        run.stderr
            .contains("requested instance type \"huge\" is not configured"),
        "{}",
        run.output()
    );
    assert!(
        !run.stderr.contains("creating instance"),
        "{}",
        run.output()
    );
}

#[cfg(feature = "ec2")]
mod ec2 {
    use super::*;
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_ec2::types::{Filter, InstanceStateName};

    const ACCESS_KEY: &str = "AKIDCLOUDTEST";
    /// moto records another fingerprint for Ed25519 keys than EC2 does, so a second driver
    /// (the second subnet's run) would not find the imported key pair; with RSA it does.
    const RSA: &[&str] = &["-t", "rsa", "-b", "2048"];
    /// An image moto knows.
    const MOTO_IMAGE: &str = "ami-12c6146b";
    const SECRET_KEY: &str = "cloudtest-moto-secret-access-key-0123456789";

    /// A running moto_server on 127.0.0.1, killed on drop.
    struct Moto {
        child: std::process::Child,
        port: u16,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn answers(port: u16) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let req = format!(
            "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.lines().next().is_some_and(|l| l.contains(" 200"))
    }

    impl Moto {
        fn start() -> Moto {
            let port = sshd::free_port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start moto_server ({e}): PyPI moto[server]; scripts/test installs it")
                });
            let mut moto = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(90);
            while !answers(port) {
                if let Ok(Some(st)) = moto.child.try_wait() {
                    panic!("moto_server exited early with {st}");
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not answer on 127.0.0.1:{port} within 90 s"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            moto
        }

        fn endpoint(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        fn client(&self) -> aws_sdk_ec2::Client {
            let conf = aws_sdk_ec2::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "t"))
                .endpoint_url(self.endpoint())
                .http_client(
                    aws_smithy_http_client::Builder::new()
                        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                        ))
                        .build_https(),
                )
                .build();
            aws_sdk_ec2::Client::from_conf(conf)
        }

        /// A config on this moto with `ImageID` = `image` and `extra_params`.
        fn config(&self, s: &Setup, image: &str, extra_params: &str) -> PathBuf {
            s.config(
                "ec2",
                &format!(
                    "          Region: us-east-1\n          AccessKeyID: {ACCESS_KEY}\n          SecretAccessKey: {SECRET_KEY}\n          Endpoint: {}\n          AdminUsername: crunch\n{extra_params}",
                    self.endpoint()
                ),
                &format!("        ImageID: {image}\n        TimeoutBooting: 20s\n"),
            )
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Every instance moto knows with the test's InstanceSetID: (ID, state, subnet).
    fn test_instances(
        rt: &tokio::runtime::Runtime,
        client: &aws_sdk_ec2::Client,
    ) -> Vec<(String, InstanceStateName, String)> {
        let out = rt
            .block_on(
                client
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name("tag:ArvadosInstanceSetID")
                            .values(DEFAULT_INSTANCE_SET_ID)
                            .build(),
                    )
                    .send(),
            )
            .expect("DescribeInstances");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.state()
                        .and_then(|s| s.name())
                        .cloned()
                        .unwrap_or(InstanceStateName::Pending),
                    i.subnet_id().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn ec2_on_moto_passes_and_leaves_nothing_running() {
        let moto = Moto::start();
        let s = Setup::with_key("cloudtest-ec2", RSA);
        // The image of the config is not used: -image-id overrides it.
        let config = moto.config(&s, "ami-not-this-one", "");
        let run = run_bin(
            &[
                "cloudtest",
                "--config",
                path_str(&config),
                "--skip-boot-probe",
                "-image-id",
                MOTO_IMAGE,
            ],
            "",
        );
        assert!(run.status.success(), "{}", run.output());
        let log = &run.stderr;
        for want in [
            "created instance",
            "found our instance in the list",
            "all expected tags are present",
            "skipping the boot probe",
            "instance no longer appears in the list",
            "cloudtest passed",
        ] {
            assert!(log.contains(want), "log lacks {want:?}:\n{}", run.output());
        }
        assert!(
            log.contains("ssh -p22 crunch@"),
            "login hint:\n{}",
            run.output()
        );
        s.assert_no_secrets(&run, &[SECRET_KEY]);

        let rt = runtime();
        let client = moto.client();
        let seen = test_instances(&rt, &client);
        assert_eq!(seen.len(), 1, "one test instance was created: {seen:?}");
        let (id, state, _) = &seen[0];
        assert!(log.contains(id.as_str()), "the log names {id}");
        assert_eq!(*state, InstanceStateName::Terminated, "{id} is gone");
        // The tags moto holds: the shared tags, no InstanceType or IdleBehavior.
        let out = rt
            .block_on(client.describe_instances().instance_ids(id).send())
            .expect("DescribeInstances");
        let inst = &out.reservations()[0].instances()[0];
        let tags: BTreeMap<&str, &str> = inst
            .tags()
            .iter()
            .map(|t| (t.key().unwrap_or_default(), t.value().unwrap_or_default()))
            .collect();
        assert_eq!(tags.get("Owner"), Some(&"cloudtest-suite"), "{tags:?}");
        assert_eq!(
            tags.get("ArvadosCloudTestPID"),
            Some(&run.pid.to_string().as_str())
        );
        assert!(!tags.contains_key("ArvadosInstanceType"), "{tags:?}");
        assert!(!tags.contains_key("ArvadosIdleBehavior"), "{tags:?}");
        assert_eq!(inst.instance_type().map(|t| t.as_str()), Some("t3.small"));
        assert_eq!(inst.image_id(), Some(MOTO_IMAGE));
    }

    #[test]
    fn ec2_on_moto_runs_once_per_subnet() {
        let moto = Moto::start();
        let rt = runtime();
        let client = moto.client();
        let vpc = rt
            .block_on(client.create_vpc().cidr_block("10.7.0.0/16").send())
            .expect("CreateVpc");
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("VPC ID")
            .to_string();
        let mut subnets = Vec::new();
        for cidr in ["10.7.1.0/24", "10.7.2.0/24"] {
            let out = rt
                .block_on(
                    client
                        .create_subnet()
                        .vpc_id(&vpc_id)
                        .cidr_block(cidr)
                        .send(),
                )
                .expect("CreateSubnet");
            subnets.push(
                out.subnet()
                    .and_then(|s| s.subnet_id())
                    .expect("subnet ID")
                    .to_string(),
            );
        }
        let s = Setup::with_key("cloudtest-ec2-subnets", RSA);
        let config = moto.config(
            &s,
            MOTO_IMAGE,
            &format!("          SubnetID: [{}, {}]\n", subnets[0], subnets[1]),
        );
        let run = run_bin(
            &[
                "cloudtest",
                "-config",
                path_str(&config),
                "-skip-boot-probe",
            ],
            "",
        );
        assert!(run.status.success(), "{}", run.output());
        for (i, subnet) in subnets.iter().enumerate() {
            assert!(
                run.stderr
                    .contains(&format!("running tests using SubnetID[{i}] \"{subnet}\"")),
                "{}",
                run.output()
            );
        }
        let mut seen = test_instances(&rt, &client);
        seen.sort_by(|a, b| a.2.cmp(&b.2));
        let mut want = subnets.clone();
        want.sort();
        assert_eq!(
            seen.iter().map(|s| s.2.clone()).collect::<Vec<_>>(),
            want,
            "one instance per subnet: {seen:?}"
        );
        assert!(
            seen.iter()
                .all(|(_, st, _)| *st == InstanceStateName::Terminated),
            "{seen:?}"
        );
        s.assert_no_secrets(&run, &[SECRET_KEY]);
    }
}
