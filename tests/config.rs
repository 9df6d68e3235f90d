//! Integration tests of the config loader and the `check-config` subcommand.
//!
//! The loader is exercised through its public API on the fixtures in `fixtures/config` and on
//! small inline configs; the binary is run as a subprocess on files written to a temporary
//! directory. Every test that involves a secret plants a recognisable value and asserts that it
//! appears in no error, warning, summary or `Debug` output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arvados_dispatch_cloud::config::{
    self, ConfigError, Loaded, host_port, instance_set_id, quota_group::ec2_quota_group,
};
use arvados_dispatch_cloud::core::config::{CloudVmsConfig, ContainersConfig};

const GIB: i64 = 1 << 30;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/config")
        .join(name)
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).expect("fixture is readable")
}

fn load(text: &str) -> Loaded {
    match config::load_str(text, "test.yml") {
        Ok(l) => l,
        Err(e) => panic!("config should load, got: {e}"),
    }
}

fn load_err(text: &str) -> String {
    match config::load_str(text, "test.yml") {
        Ok(l) => panic!("config should fail, loaded: {l:?}"),
        Err(e) => e.to_string(),
    }
}

/// A file in a fresh temporary directory, removed when dropped.
struct TempFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "adc-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.yml");
        std::fs::write(&path, contents).expect("write temp config");
        TempFile { dir, path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(args)
        .env_remove("ARVADOS_CONFIG")
        .output()
        .expect("run arvados-dispatch-cloud")
}

fn check_config(path: &Path) -> (i32, String, String) {
    let out = run(&[
        "check-config",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

fn count_matching(warnings: &[String], needle: &str) -> usize {
    warnings.iter().filter(|w| w.contains(needle)).count()
}

// ---------------------------------------------------------------------------------------------
// The install guide's examples (legacy layout).

#[test]
fn install_guide_ec2_loads() {
    let l = config::load_file(&fixture("install-guide-ec2.yml")).expect("fixture loads");
    assert_eq!(l.cluster_id, "uuid_prefix");
    assert_eq!(l.core.cluster_id, "uuid_prefix");
    assert_eq!(l.core.cloud_vms.driver, "ec2");
    assert_eq!(l.core.cloud_vms.image_id, "ami-01234567890abcdef");
    assert_eq!(
        l.core.cloud_vms.boot_probe_command,
        "sudo systemctl status docker"
    );
    assert_eq!(l.listen.as_deref(), Some(":9006"));
    assert_eq!(l.listen_host_port().as_deref(), Some(":9006"));
    assert_eq!(
        l.controller_url.as_deref(),
        Some("https://uuid_prefix.arvadosapi.com")
    );
    assert!(!l.tls_insecure);
    assert_eq!(l.secrets.management_token, "xyzzy");
    assert_eq!(l.secrets.system_root_token, "z".repeat(50));
    assert!(
        l.secrets
            .dispatch_private_key
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\nMIIEpQIBAAKCAQEAqXoCzcOBkFQ7")
    );
    assert!(l.secrets.dispatch_private_key.contains("\n[...]\n"));
    assert!(
        l.secrets
            .dispatch_private_key
            .ends_with("-----END RSA PRIVATE KEY-----\n")
    );
    assert_eq!(l.instance_set_id, format!("{:x}", Md5Hex(&"z".repeat(50))));
    assert_eq!(l.driver_parameters["Region"], "us-east-1");
    assert_eq!(l.driver_parameters["SecurityGroupIDs"][0], "sg-0123abcd");

    let md = &l.core.instance_types["x1md"];
    assert_eq!(md.name, "x1md");
    assert_eq!(md.provider_type, "x1.medium");
    assert_eq!(md.vcpus, 8);
    assert_eq!(md.ram, 64 * GIB);
    assert_eq!(md.included_scratch, 64_000_000_000);
    assert_eq!(md.scratch, 64_000_000_000);
    assert_eq!(md.price, 0.62);
    assert!(!md.preemptible);
    assert_eq!(md.quota_group, "x");
    let lg = &l.core.instance_types["x1lg"];
    assert_eq!(
        (lg.vcpus, lg.ram, lg.scratch, lg.price),
        (16, 128 * GIB, 128_000_000_000, 1.23)
    );
    assert_eq!(l.core.instance_types.len(), 2);

    // Each legacy key gives exactly one deprecation warning naming the old and the new path.
    let w = &l.warnings;
    assert_eq!(count_matching(w, "deprecated"), 3, "{w:#?}");
    assert!(w.contains(&"Clusters.uuid_prefix.CloudVMs is deprecated: use Clusters.uuid_prefix.Containers.CloudVMs".to_string()), "{w:#?}");
    assert!(w.contains(&"Clusters.uuid_prefix.Dispatch.PrivateKey is deprecated: use Clusters.uuid_prefix.Containers.DispatchPrivateKey".to_string()), "{w:#?}");
    assert!(w.contains(&"Clusters.uuid_prefix.NodeProfiles.apiserver.arvados-dispatch-cloud.Listen is deprecated: use Clusters.uuid_prefix.Services.DispatchCloud.InternalURLs".to_string()), "{w:#?}");
    assert_eq!(count_matching(w, "unknown key"), 0, "{w:#?}");
}

#[test]
fn install_guide_azure_loads() {
    let l = config::load_file(&fixture("install-guide-azure.yml")).expect("fixture loads");
    assert_eq!(l.core.cloud_vms.driver, "azure");
    assert!(l.core.cloud_vms.image_id.ends_with(".vhd"));
    assert_eq!(l.driver_parameters["Location"], "centralus");
    assert_eq!(l.driver_parameters["DeleteDanglingResourcesAfter"], "20s");
    let names: Vec<&str> = l
        .core
        .types_by_price()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["x1md", "x1lg"]);
    // Quota groups are an EC2 notion.
    assert!(
        l.core
            .instance_types
            .values()
            .all(|t| t.quota_group.is_empty())
    );
    assert_eq!(
        count_matching(&l.warnings, "deprecated"),
        3,
        "{:#?}",
        l.warnings
    );
}

#[test]
fn check_config_accepts_both_install_guide_examples() {
    for (name, secrets) in [
        (
            "install-guide-ec2.yml",
            &[
                "yKJAPmoCQOMtYWzEUQ1tKTyrocTcbH60CRvGP3pM",
                "EALMF21BJC7MKNF9FVVR",
            ][..],
        ),
        (
            "install-guide-azure.yml",
            &["2WyXt0XFbEtutnf2hp528t6Wk9S5bOHWkRaaWwavKQo="][..],
        ),
    ] {
        let (code, stdout, stderr) = check_config(&fixture(name));
        assert_eq!(code, 0, "{name}: stderr: {stderr}");
        assert!(
            stdout.contains("x1md") && stdout.contains("x1lg"),
            "{name}: {stdout}"
        );
        assert!(stdout.contains("uuid_prefix"), "{stdout}");
        assert!(
            stdout.contains("64 GiB") && stdout.contains("128 GiB"),
            "{stdout}"
        );
        assert!(
            stdout.contains("$0.620/h") && stdout.contains("$1.230/h"),
            "{stdout}"
        );
        assert!(stdout.contains(":9006"), "{stdout}");
        // Cheapest first.
        assert!(stdout.find("x1md") < stdout.find("x1lg"), "{stdout}");
        for line in stderr.lines() {
            assert!(line.starts_with("warning: "), "{name}: {line}");
        }
        assert!(
            stderr.contains("warning: Clusters.uuid_prefix.CloudVMs is deprecated"),
            "{stderr}"
        );
        let both = format!("{stdout}{stderr}");
        let token = "z".repeat(50);
        for secret in
            secrets
                .iter()
                .copied()
                .chain([token.as_str(), "MIIEpQIBAAKCAQEAqXoCzcOBkFQ7", "xyzzy"])
        {
            assert!(
                !both.contains(secret),
                "{name}: output shows a secret ({secret})"
            );
        }
    }
}

#[test]
fn check_config_reports_a_bad_byte_size_with_its_path() {
    let text = fixture_text("install-guide-ec2.yml").replacen("RAM: 64GiB", "RAM: 64GiBs", 1);
    assert!(text.contains("RAM: 64GiBs"));
    let f = TempFile::new(&text);
    let (code, stdout, stderr) = check_config(&f.path);
    assert_ne!(code, 0);
    assert_eq!(code, 2);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("InstanceTypes.x1md.RAM"), "{stderr}");
    assert!(
        stderr
            .contains(r#"Clusters.uuid_prefix.InstanceTypes.x1md.RAM: invalid byte size "64GiBs""#),
        "{stderr}"
    );
}

#[test]
fn check_config_requires_an_ec2_region() {
    // Driver ec2 is the default; its DriverParameters are parsed as the driver parses them.
    let f = TempFile::new(&format!(
        "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        DriverParameters: {{SecretAccessKey: {CLOUD_SECRET}}}\n    InstanceTypes:\n      t1: {{VCPUs: 2, RAM: 4GiB, Price: 0.1}}\n"
    ));
    let (code, stdout, stderr) = check_config(&f.path);
    assert_eq!(code, 2, "{stdout}");
    assert_eq!(
        stderr.trim_end(),
        "error: Clusters.zzzzz.Containers.CloudVMs.DriverParameters.Region: the EC2 driver needs a region, such as us-east-1"
    );
    assert_no_secret(&stderr);
    // Loopback has no Region.
    let f = TempFile::new(
        "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: loopback\n",
    );
    let (code, _, stderr) = check_config(&f.path);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_config_fails_on_missing_file_and_bad_yaml() {
    let (code, _, stderr) = check_config(Path::new("/nonexistent/arvados/config.yml"));
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("error: cannot read /nonexistent/arvados/config.yml"),
        "{stderr}"
    );

    let f = TempFile::new("Clusters:\n  zzzzz: [unclosed\n");
    let (code, _, stderr) = check_config(&f.path);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid YAML"), "{stderr}");
}

#[test]
fn check_config_takes_the_global_config_option_and_arvados_config() {
    let f = TempFile::new(
        "Clusters:\n  abcde:\n    Containers:\n      CloudVMs:\n        DriverParameters: {Region: us-east-1}\n    InstanceTypes:\n      t1: {VCPUs: 2, RAM: 4GiB, Price: 0.1}\n",
    );
    let p = f.path.to_str().expect("utf-8");
    let out = run(&["--config", p, "check-config"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("abcde"));

    let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .arg("check-config")
        .env("ARVADOS_CONFIG", p)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("t1"));
}

// ---------------------------------------------------------------------------------------------
// The current layout.

#[test]
fn current_layout_loads_every_key() {
    let l = config::load_file(&fixture("current-layout.yml")).expect("fixture loads");
    assert!(l.warnings.is_empty(), "{:#?}", l.warnings);
    assert_eq!(l.cluster_id, "zzzzz");
    assert_eq!(l.listen.as_deref(), Some("http://dispatch.internal:9006/"));
    assert_eq!(
        l.listen_host_port().as_deref(),
        Some("dispatch.internal:9006")
    );
    assert_eq!(
        l.controller_url.as_deref(),
        Some("https://zzzzz.example.com")
    );
    assert_eq!(l.instance_set_id, "zzzzz-gj3su-0123456789abcde");
    assert!(
        l.secrets
            .dispatch_private_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    );

    let c = &l.core.containers;
    assert_eq!(c.max_dispatch_attempts, 5);
    assert_eq!(c.stale_lock_timeout, Duration::from_secs(120));
    assert_eq!(c.reserve_extra_ram, GIB);
    assert_eq!(c.local_keep_blob_buffers_per_vcpu, 0);
    assert_eq!(c.maximum_price_factor, 1.2);
    assert_eq!(c.preemptible_price_factor, 0.5);
    assert_eq!(c.crunch_run_command, "/usr/bin/crunch-run");
    assert_eq!(
        c.crunch_run_arguments_list,
        ["--cgroup-parent-subsystem=cpuset"]
    );
    assert_eq!(c.runtime_engine, "singularity");

    let v = &l.core.cloud_vms;
    assert_eq!(v.driver, "ec2");
    assert_eq!(v.image_id, "ami-0a1b2c3d4e5f67890");
    assert_eq!(v.poll_interval, Duration::from_secs(5));
    assert_eq!(v.max_instances, 100);
    assert_eq!(v.initial_quota_estimate, 20);
    assert_eq!(v.supervisor_fraction, 0.3);
    assert_eq!(v.max_running_containers_per_instance, 4);
    assert_eq!(v.max_cloud_ops_per_second, 5.0);
    assert_eq!(v.max_concurrent_instance_create_ops, 2);
    assert_eq!(v.sync_interval, Duration::from_secs(30));
    assert_eq!(v.probe_interval, Duration::from_secs(20));
    assert_eq!(v.max_probes_per_second, 15.0);
    assert_eq!(v.boot_probe_command, "systemctl is-system-running");
    assert_eq!(v.timeout_idle, Duration::from_secs(180));
    assert_eq!(v.timeout_booting, Duration::from_secs(900));
    assert_eq!(v.timeout_probe, Duration::from_secs(720));
    assert_eq!(v.timeout_shutdown, Duration::from_secs(20));
    assert_eq!(v.timeout_signal, Duration::from_secs(7));
    assert_eq!(v.timeout_term, Duration::from_secs(180));
    assert_eq!(v.timeout_stale_run_lock, Duration::from_secs(10));
    assert_eq!(v.ssh_port, "2222");
    assert_eq!(v.instance_init_command, "echo hello");
    assert_eq!(v.deploy_runner_binary, "");
    assert_eq!(v.deploy_runner_directory, "/var/lib/arvados/crunch-run");
    assert!(!v.deploy_public_key);
    let tags: BTreeMap<String, String> = [("CostCenter", "1234"), ("Project", "genomics")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    assert_eq!(v.resource_tags, tags);
    assert_eq!(v.tag_key_prefix, "Arv");

    let types = &l.core.instance_types;
    assert_eq!(types.len(), 10);
    let m5 = &types["m5large"];
    assert_eq!(
        (m5.included_scratch, m5.added_scratch, m5.scratch),
        (0, 50_000_000_000, 50_000_000_000)
    );
    assert_eq!(types["r5_2xlarge"].scratch, 3 << 39);
    let g5 = &types["g5xlarge"];
    assert_eq!(g5.gpu.stack, "cuda");
    assert_eq!(g5.gpu.driver_version, "12.4");
    assert_eq!(g5.gpu.hardware_target, "8.6");
    assert_eq!(g5.gpu.device_count, 1);
    assert_eq!(g5.gpu.vram, 24 * GIB);

    // Preemptible variants: same ProviderType, price × factor.
    let g5p = &types["g5xlarge.preemptible"];
    assert!(g5p.preemptible);
    assert_eq!(g5p.provider_type, "g5.xlarge");
    assert_eq!(g5p.price, 1.006 * 0.5);
    assert_eq!(g5p.gpu, g5.gpu);
    assert_eq!(g5p.ram, g5.ram);

    // Quota groups: the operator's map ("g" → "gpu") merged over the shipped one.
    let groups: BTreeMap<&str, &str> = types
        .iter()
        .map(|(k, t)| (k.as_str(), t.quota_group.as_str()))
        .collect();
    assert_eq!(groups["m5large"], "standard");
    assert_eq!(groups["m5large.preemptible"], "standard-spot");
    assert_eq!(groups["c5xlarge"], "standard");
    assert_eq!(groups["r5_2xlarge"], "standard");
    assert_eq!(groups["g5xlarge"], "gpu");
    assert_eq!(groups["p5_48xlarge"], "p5");
    assert_eq!(groups["p5_48xlarge.preemptible"], "p5-spot");

    // DriverParameters come through untouched.
    assert_eq!(l.driver_parameters["SubnetID"][1], "subnet-4567efgh");
    assert_eq!(l.driver_parameters["InstanceTypeQuotaGroups"]["g"], "gpu");
}

#[test]
fn check_config_summary_for_current_layout() {
    let (code, stdout, stderr) = check_config(&fixture("current-layout.yml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    for needle in [
        "zzzzz",
        "ec2",
        "http://dispatch.internal:9006/",
        "zzzzz-gj3su-0123456789abcde",
        "100",
        "NAME",
        "PROVIDER TYPE",
        "VCPUS",
        "RAM",
        "SCRATCH",
        "PRICE",
        "PREEMPTIBLE",
        "GPU",
        "m5large.preemptible",
        "$0.048/h",
        "8 x cuda 9.0",
        "80 GiB",
        "2 TiB",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // Sorted by price: the cheapest type's row comes before the dearest one's.
    let first = stdout.find("m5large.preemptible").expect("row");
    let last = stdout.find("p5_48xlarge ").expect("row");
    assert!(first < last);
    for secret in [
        "Z6ZLv9sPycT2NH9atQJAj4pxJd8Ey9nDvcmTHWXQAGzCqPZ5M5",
        "mAnAgEmEnTtOkEn",
        "tEsTkEyNoTrEaL",
        "sEcReTaCcEsSkEy",
        "AKIAtEsTaCcEsSkEyId0",
        "pG-pAsSwOrD",
        "bLoBsIgNiNgKeY",
    ] {
        assert!(!stdout.contains(secret), "summary shows {secret}");
    }
}

#[test]
fn minimal_config_gets_the_arvados_defaults() {
    let l = load("Clusters:\n  zzzzz: {}\n");
    assert_eq!(l.core.containers, ContainersConfig::default());
    assert_eq!(l.core.cloud_vms, CloudVmsConfig::default());
    assert!(l.core.instance_types.is_empty());
    assert_eq!(l.listen, None);
    assert_eq!(l.controller_url, None);
    assert_eq!(l.driver_parameters, serde_json::json!({}));
    let w = &l.warnings;
    assert!(
        w.iter()
            .any(|m| m.starts_with("Clusters.zzzzz.SystemRootToken: secret token is not set")),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|m| m.starts_with("Clusters.zzzzz.ManagementToken: secret token is not set")),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|m| m.starts_with("Clusters.zzzzz.Containers.DispatchPrivateKey: not set")),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|m| m.starts_with("Clusters.zzzzz.InstanceTypes: no instance types configured")),
        "{w:#?}"
    );
    assert!(
        w.iter().any(|m| m.starts_with(
            "Clusters.zzzzz.Services.Controller: neither ExternalURL nor InternalURLs"
        )),
        "{w:#?}"
    );
    // A null cluster is an empty one.
    assert_eq!(load("Clusters:\n  zzzzz:\n").cluster_id, "zzzzz");
}

#[test]
fn zero_means_the_code_fallback() {
    let l = load(
        "Clusters:
  zzzzz:
    Containers:
      CloudVMs:
        SyncInterval: 0
        ProbeInterval: 0s
        TimeoutIdle: \"0\"
        TimeoutBooting: 0
        TimeoutProbe: -1s
        TimeoutShutdown: 0
        TimeoutSignal: 0
        TimeoutTERM: 0
        TimeoutStaleRunLock: 0
        MaxProbesPerSecond: 0
        MaxCloudOpsPerSecond: 0
        MaxConcurrentInstanceCreateOps: 0
        MaxInstances: 0
        PollInterval: 0
        BootProbeCommand: \"\"
        SSHPort: \"\"
        DeployRunnerBinary: \"\"
",
    );
    let d = CloudVmsConfig::default();
    let v = &l.core.cloud_vms;
    assert_eq!(v.sync_interval, d.sync_interval);
    assert_eq!(v.probe_interval, d.probe_interval);
    assert_eq!(v.timeout_idle, d.timeout_idle);
    assert_eq!(v.timeout_booting, d.timeout_booting);
    assert_eq!(v.timeout_probe, d.timeout_probe);
    assert_eq!(v.timeout_shutdown, d.timeout_shutdown);
    assert_eq!(v.timeout_signal, d.timeout_signal);
    assert_eq!(v.timeout_term, d.timeout_term);
    assert_eq!(v.timeout_stale_run_lock, d.timeout_stale_run_lock);
    assert_eq!(v.max_probes_per_second, d.max_probes_per_second);
    // These have no fallback: 0 means unlimited, or no wait.
    assert_eq!(v.max_cloud_ops_per_second, 0.0);
    assert_eq!(v.max_concurrent_instance_create_ops, 0);
    assert_eq!(v.max_instances, 0);
    assert_eq!(v.poll_interval, Duration::ZERO);
    assert_eq!(v.boot_probe_command, "true");
    assert_eq!(v.ssh_port, "ssh");
    assert_eq!(v.deploy_runner_binary, "");
}

#[test]
fn negative_counts_act_as_zero_with_a_warning() {
    let l =
        load("Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        MaxInstances: -1\n");
    assert_eq!(l.core.cloud_vms.max_instances, 0);
    assert!(
        l.warnings.contains(
            &"Clusters.zzzzz.Containers.CloudVMs.MaxInstances: negative value -1 is treated as 0"
                .to_string()
        ),
        "{:#?}",
        l.warnings
    );
}

#[test]
fn durations_and_byte_sizes_in_yaml() {
    let l = load(
        "Clusters:
  zzzzz:
    Containers:
      StaleLockTimeout: 1h30m
      ReserveExtraRAM: 500MiB
      CloudVMs:
        TimeoutIdle: 1.5h
        TimeoutSignal: 500ms
        ProbeInterval: 250us
    InstanceTypes:
      a: {VCPUs: 1, RAM: 1e9, IncludedScratch: 1.5GiB, AddedScratch: 1000, Price: 1}
      b: {VCPUs: 1.0, RAM: \"128GB\", IncludedScratch: 12345M}
",
    );
    assert_eq!(
        l.core.containers.stale_lock_timeout,
        Duration::from_secs(5400)
    );
    assert_eq!(l.core.containers.reserve_extra_ram, 500 << 20);
    assert_eq!(l.core.cloud_vms.timeout_idle, Duration::from_secs(5400));
    assert_eq!(l.core.cloud_vms.timeout_signal, Duration::from_millis(500));
    assert_eq!(l.core.cloud_vms.probe_interval, Duration::from_micros(250));
    let a = &l.core.instance_types["a"];
    assert_eq!(a.ram, 1_000_000_000);
    assert_eq!(a.included_scratch, 3 * GIB / 2);
    assert_eq!(a.scratch, 3 * GIB / 2 + 1000);
    assert_eq!(a.price, 1.0);
    let b = &l.core.instance_types["b"];
    assert_eq!(b.vcpus, 1);
    assert_eq!(b.ram, 128_000_000_000);
    assert_eq!(b.scratch, 12_345_000_000);
    assert_eq!(b.price, 0.0);
    assert_eq!(b.provider_type, "b");
}

// ---------------------------------------------------------------------------------------------
// Errors name the full path and the value.

#[test]
fn errors_name_path_and_value() {
    let cases: &[(&str, &str)] = &[
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        TimeoutIdle: 1x\n",
            r#"Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration "1x""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        TimeoutIdle: 60\n",
            "Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration 60: missing unit",
        ),
        (
            "Clusters:\n  zzzzz:\n    InstanceTypes:\n      x1md:\n        Price: abc\n",
            r#"Clusters.zzzzz.InstanceTypes.x1md.Price: expected a number, got "abc""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    InstanceTypes:\n      x1md:\n        VCPUs: 2.5\n",
            "Clusters.zzzzz.InstanceTypes.x1md.VCPUs: expected an integer, got 2.5",
        ),
        (
            "Clusters:\n  zzzzz:\n    InstanceTypes:\n      x1md:\n        RAM: 64gb\n",
            r#"Clusters.zzzzz.InstanceTypes.x1md.RAM: invalid byte size "64gb""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      ReserveExtraRAM: lots\n",
            r#"Clusters.zzzzz.Containers.ReserveExtraRAM: invalid byte size "lots""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: gce\n",
            r#"Clusters.zzzzz.Containers.CloudVMs.Driver: unknown driver "gce" (expected ec2, azure or loopback)"#,
        ),
        (
            "Clusters:\n  zzzzz:\n    CloudVMs:\n      Driver: EC2\n",
            r#"Clusters.zzzzz.CloudVMs.Driver: unknown driver "EC2""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        DeployPublicKey: maybe\n",
            r#"Clusters.zzzzz.Containers.CloudVMs.DeployPublicKey: expected true or false, got "maybe""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs: 5\n",
            "Clusters.zzzzz.Containers.CloudVMs: expected a mapping, got a number",
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CrunchRunArgumentsList: --foo\n",
            "Clusters.zzzzz.Containers.CrunchRunArgumentsList: expected a list of strings, got a string",
        ),
        (
            "Clusters:\n  zzzzz:\n    InstanceTypes:\n      g:\n        GPU: {Stack: cuda, DeviceCount: 1, DriverVersion: abc}\n",
            r#"Clusters.zzzzz.InstanceTypes.g.GPU.DriverVersion: invalid driver version "abc""#,
        ),
        (
            "Clusters:\n  zzzzz:\n    InstanceTypes:\n      g:\n        GPU: {Stack: cuda, DeviceCount: 2}\n",
            r#"Clusters.zzzzz.InstanceTypes.g.GPU.DriverVersion: invalid driver version """#,
        ),
        (
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: loopback\n    InstanceTypes:\n      a: {VCPUs: 1, RAM: 1GiB}\n      b: {VCPUs: 1, RAM: 1GiB}\n",
            "Clusters.zzzzz.InstanceTypes: the loopback driver supports at most one instance type, found 2",
        ),
        (
            "Clusters:\n  aaaaa: {}\n  bbbbb: {}\n",
            "Clusters: 2 clusters are configured (aaaaa, bbbbb)",
        ),
        (
            "Clusters: {}\n",
            "test.yml: config does not define any clusters",
        ),
        ("", "test.yml: config does not define any clusters"),
        (
            "just a string\n",
            "test.yml: expected a mapping with a Clusters key, got a string",
        ),
        (
            "Clusters:\n  zzzzz:\n    Services:\n      DispatchCloud:\n        InternalURLs: [a]\n",
            "Clusters.zzzzz.Services.DispatchCloud.InternalURLs: expected a mapping, got a list",
        ),
    ];
    for (text, want) in cases {
        let got = load_err(text);
        assert!(
            got.starts_with(want),
            "config:\n{text}\nwant prefix: {want}\ngot:         {got}"
        );
    }
}

#[test]
fn yaml_errors_name_the_origin() {
    let err = config::load_str("a: [1\n", "/etc/arvados/config.yml").expect_err("bad YAML");
    assert!(matches!(err, ConfigError::Yaml { .. }));
    assert!(
        err.to_string()
            .starts_with("/etc/arvados/config.yml: invalid YAML: "),
        "{err}"
    );
    let err = config::load_file(Path::new("/nonexistent/config.yml")).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }));
}

// ---------------------------------------------------------------------------------------------
// Warnings.

#[test]
fn unknown_keys_warn_with_their_paths() {
    let l = load(
        "Clusters:
  zzzzz:
    Bogus: 1
    Containers:
      Nonsense: true
      CloudVMs:
        TimeoutIdel: 5m
      SLURM: {PrioritySpread: 5}
      LSF: {BsubSudoUser: crunch}
      Logging: {MaxAge: 720h}
      ShellAccess: {Admin: true}
      MaxRetryAttempts: 3
    InstanceTypes:
      t:
        VCPUs: 1
        RAM: 1GiB
        Colour: blue
        GPU: {Stack: cuda, DeviceCount: 1, DriverVersion: '12.0', Cores: 5}
    Services:
      DispatchCloud:
        InternalURLs:
          \"http://localhost:9006/\": {Bogus: x}
        Extra: 1
      Keepstore: {InternalURLs: {\"http://k:1\": {}}, Whatever: 2}
      NotAService: {}
    PostgreSQL: {Connection: {password: x}, Foo: bar}
    SystemLogs: {LogLevel: debug}
    API: {MaxItemsPerResponse: 1000}
    Collections: {BlobSigningKey: abc}
    Users: {AutoSetupNewUsers: true}
    Login: {LDAP: {Enable: false}}
    Volumes: {zzzzz-nyw5e-000000000000000: {Driver: S3}}
    RemoteClusters: {yyyyy: {Host: yyyyy.example}}
    Mail: {}
    Workbench: {SiteName: x}
    StorageClasses: {default: {Default: true}}
    AuditLogs: {MaxAge: 1h}
    Git: {}
    TLS: {Certificate: /x, Key: /y, Insecure: true}
",
    );
    let mut unknown: Vec<&str> = l
        .warnings
        .iter()
        .filter_map(|w| w.strip_suffix(": unknown key"))
        .collect();
    unknown.sort_unstable();
    assert_eq!(
        unknown,
        [
            "Clusters.zzzzz.Bogus",
            "Clusters.zzzzz.Containers.CloudVMs.TimeoutIdel",
            "Clusters.zzzzz.Containers.Nonsense",
            "Clusters.zzzzz.InstanceTypes.t.Colour",
            "Clusters.zzzzz.InstanceTypes.t.GPU.Cores",
            "Clusters.zzzzz.Services.DispatchCloud.Extra",
            "Clusters.zzzzz.Services.DispatchCloud.InternalURLs.http://localhost:9006/.Bogus",
        ],
        "{:#?}",
        l.warnings
    );
    assert!(l.tls_insecure);
    // The misspelled key is not used.
    assert_eq!(l.core.cloud_vms.timeout_idle, Duration::from_secs(60));
}

#[test]
fn keys_match_case_insensitively_with_a_warning() {
    let l = load("Clusters:\n  zzzzz:\n    Containers:\n      RunTimeEngine: singularity\n");
    assert_eq!(l.core.containers.runtime_engine, "singularity");
    assert_eq!(
        count_matching(
            &l.warnings,
            "Clusters.zzzzz.Containers.RunTimeEngine: unknown key; it is used as RuntimeEngine"
        ),
        1,
        "{:#?}",
        l.warnings
    );
}

#[test]
fn legacy_and_current_together_current_wins() {
    let l = load(
        "Clusters:
  zzzzz:
    NodeProfiles:
      '*':
        arvados-dispatch-cloud: {Listen: ':9006'}
        arvados-controller: {Listen: ':8003'}
    Services:
      DispatchCloud:
        InternalURLs:
          \"http://dispatch.example:9007/\": {}
    CloudVMs:
      ImageID: old-image
      TimeoutIdle: 5m
    Dispatch:
      PrivateKey: OLD-KEY
      PollInterval: 3s
      TimeoutTERM: 9m
      StaleLockTimeout: 7m
    Containers:
      MaxComputeVMs: 12
      DispatchPrivateKey: NEW-KEY
      CloudVMs:
        ImageID: new-image
        PollInterval: 4s
",
    );
    assert_eq!(l.listen.as_deref(), Some("http://dispatch.example:9007/"));
    assert_eq!(l.core.cloud_vms.image_id, "new-image");
    assert_eq!(l.core.cloud_vms.timeout_idle, Duration::from_secs(300));
    assert_eq!(l.core.cloud_vms.poll_interval, Duration::from_secs(4));
    assert_eq!(l.core.cloud_vms.timeout_term, Duration::from_secs(540));
    assert_eq!(l.core.cloud_vms.max_instances, 12);
    assert_eq!(
        l.core.containers.stale_lock_timeout,
        Duration::from_secs(420)
    );
    assert_eq!(l.secrets.dispatch_private_key, "NEW-KEY");
    let w = &l.warnings;
    let expected = [
        "Clusters.zzzzz.NodeProfiles.*.arvados-dispatch-cloud.Listen is deprecated and ignored: Clusters.zzzzz.Services.DispatchCloud.InternalURLs is also set",
        "Clusters.zzzzz.CloudVMs is deprecated: use Clusters.zzzzz.Containers.CloudVMs",
        "Clusters.zzzzz.CloudVMs.ImageID is ignored: Clusters.zzzzz.Containers.CloudVMs.ImageID is also set",
        "Clusters.zzzzz.Dispatch.PrivateKey is deprecated and ignored: Clusters.zzzzz.Containers.DispatchPrivateKey is also set",
        "Clusters.zzzzz.Dispatch.StaleLockTimeout is deprecated: use Clusters.zzzzz.Containers.StaleLockTimeout",
        "Clusters.zzzzz.Dispatch.PollInterval is deprecated and ignored: Clusters.zzzzz.Containers.CloudVMs.PollInterval is also set",
        "Clusters.zzzzz.Dispatch.TimeoutTERM is deprecated: use Clusters.zzzzz.Containers.CloudVMs.TimeoutTERM",
        "Clusters.zzzzz.Containers.MaxComputeVMs is deprecated: use Clusters.zzzzz.Containers.CloudVMs.MaxInstances",
    ];
    for e in expected {
        assert_eq!(
            w.iter().filter(|m| *m == e).count(),
            1,
            "missing {e:?} in {w:#?}"
        );
    }
    // One deprecation warning per legacy key, and nothing about the secret values.
    assert_eq!(count_matching(w, "deprecated"), 7, "{w:#?}");
    assert_eq!(count_matching(w, "KEY"), 0, "{w:#?}");
}

#[test]
fn legacy_cuda_becomes_gpu() {
    let l = load(
        "Clusters:\n  zzzzz:\n    InstanceTypes:\n      g4:\n        VCPUs: 4\n        RAM: 16GiB\n        CUDA: {DriverVersion: '11.0', HardwareCapability: '7.5', DeviceCount: 1}\n",
    );
    let g = &l.core.instance_types["g4"].gpu;
    assert_eq!(
        (
            g.stack.as_str(),
            g.driver_version.as_str(),
            g.hardware_target.as_str(),
            g.device_count
        ),
        ("cuda", "11.0", "7.5", 1)
    );
    assert!(l.warnings.contains(&"Clusters.zzzzz.InstanceTypes.g4.CUDA is deprecated: use Clusters.zzzzz.InstanceTypes.g4.GPU".to_string()), "{:#?}", l.warnings);
}

#[test]
fn configured_scratch_is_ignored_with_a_warning() {
    let l = load(
        "Clusters:\n  zzzzz:\n    InstanceTypes:\n      t: {VCPUs: 1, RAM: 1GiB, Scratch: 100GB, IncludedScratch: 10GB}\n",
    );
    assert_eq!(l.core.instance_types["t"].scratch, 10_000_000_000);
    assert_eq!(
        count_matching(
            &l.warnings,
            "Clusters.zzzzz.InstanceTypes.t.Scratch: ignored"
        ),
        1,
        "{:#?}",
        l.warnings
    );
}

#[test]
fn instance_types_as_a_list_still_load() {
    let l = load(
        "Clusters:\n  zzzzz:\n    InstanceTypes:\n      - {Name: a, VCPUs: 1, RAM: 1GiB, Price: 0.5}\n      - {Name: b, ProviderType: b.big, VCPUs: 2, RAM: 2GiB, Price: 1}\n",
    );
    assert_eq!(l.core.instance_types["a"].provider_type, "a");
    assert_eq!(l.core.instance_types["b"].provider_type, "b.big");
    let err =
        load_err("Clusters:\n  zzzzz:\n    InstanceTypes:\n      - {Name: a}\n      - {Name: a}\n");
    assert!(err.contains("duplicate instance type name \"a\""), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Preemptible variants and quota groups.

#[test]
fn preemptible_variants_follow_arvados() {
    // The Arvados TestPreemptiblePriceFactor cases.
    let l = load(
        "Clusters:\n  z1111:\n    InstanceTypes:\n      Type1: {RAM: 12345M, VCPUs: 8, Price: 1.23}\n",
    );
    assert_eq!(l.core.instance_types.len(), 1);

    let l = load(
        "Clusters:\n  z2222:\n    Containers:\n      PreemptiblePriceFactor: 0.5\n    InstanceTypes:\n      Type1: {RAM: 12345M, VCPUs: 8, Price: 1.23}\n",
    );
    let types = &l.core.instance_types;
    assert_eq!(types.len(), 2);
    let p = &types["Type1.preemptible"];
    assert!(p.preemptible);
    assert_eq!(p.provider_type, "Type1");
    assert_eq!(p.price, 1.23 * 0.5);
    assert_eq!(p.ram, 12_345_000_000);
    assert!(!types["Type1"].preemptible);

    let l = load(
        "Clusters:
  z3333:
    Containers:
      PreemptiblePriceFactor: 0.5
    InstanceTypes:
      Type1: {RAM: 12345M, VCPUs: 8, Price: 1.23}
      Type1.preemptible: {ProviderType: Type1, RAM: 12345M, VCPUs: 8, Price: 1.23, Preemptible: true}
      Type2: {RAM: 23456M, VCPUs: 16, Price: 2.46}
      Type2.preemptible: {ProviderType: Type2, RAM: 23456M, VCPUs: 16, Price: 1.23, Preemptible: true}
",
    );
    let types = &l.core.instance_types;
    assert_eq!(types.len(), 4);
    assert_eq!(
        types["Type1.preemptible"].price, 1.23,
        "the configured entry is kept"
    );
    assert_eq!(types["Type2.preemptible"].price, 1.23);
    assert_eq!(
        count_matching(&l.warnings, "Type1.preemptible"),
        1,
        "{:#?}",
        l.warnings
    );
    assert_eq!(
        count_matching(&l.warnings, "Type2.preemptible"),
        0,
        "{:#?}",
        l.warnings
    );
}

#[test]
fn quota_group_examples() {
    let m: BTreeMap<String, String> = [
        ("a", "standard"),
        ("m", "standard"),
        ("t", "standard"),
        ("p5", "p5"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
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
        assert_eq!(ec2_quota_group(pt, *spot, &m), *want, "{pt} spot={spot}");
    }
}

#[test]
fn quota_groups_only_for_ec2() {
    let text = |driver: &str| {
        format!(
            "Clusters:\n  zzzzz:\n    Containers:\n      PreemptiblePriceFactor: 0.8\n      CloudVMs:\n        Driver: {driver}\n    InstanceTypes:\n      m5: {{ProviderType: m5.large, VCPUs: 2, RAM: 8GiB, Price: 0.1}}\n"
        )
    };
    let l = load(&text("ec2"));
    assert_eq!(l.core.instance_types["m5"].quota_group, "standard");
    assert_eq!(
        l.core.instance_types["m5.preemptible"].quota_group,
        "standard-spot"
    );
    let l = load(&text("azure"));
    assert_eq!(l.core.instance_types["m5"].quota_group, "");
}

// ---------------------------------------------------------------------------------------------
// InstanceSetID, listen address, loopback.

#[test]
fn instance_set_id_from_either_token_form() {
    let l = load(
        "Clusters:\n  zzzzz:\n    SystemRootToken: v2/zzzzz-gj3su-aaaaaaaaaaaaaaa/Xsecretpart000000000000000000000000000\n",
    );
    assert_eq!(l.instance_set_id, "zzzzz-gj3su-aaaaaaaaaaaaaaa");
    let l =
        load("Clusters:\n  zzzzz:\n    SystemRootToken: abcdefghijklmnopqrstuvwxyz0123456789\n");
    assert_eq!(
        l.instance_set_id,
        format!("{:x}", Md5Hex("abcdefghijklmnopqrstuvwxyz0123456789"))
    );
    assert_eq!(instance_set_id("xyzzy"), "1271ed5ef305aadabc605b1609e24c52");
}

#[test]
fn listen_address_forms() {
    let l = load(
        "Clusters:\n  zzzzz:\n    Services:\n      DispatchCloud:\n        InternalURLs:\n          \"http://host:9006/\": {}\n",
    );
    assert_eq!(l.listen.as_deref(), Some("http://host:9006/"));
    assert_eq!(l.listen_host_port().as_deref(), Some("host:9006"));
    let l = load(
        "Clusters:\n  zzzzz:\n    Services:\n      DispatchCloud:\n        InternalURLs:\n          \"https://public.example/\": {ListenURL: \"http://0.0.0.0:9006/\"}\n",
    );
    assert_eq!(l.listen.as_deref(), Some("http://0.0.0.0:9006/"));
    assert_eq!(l.listen_host_port().as_deref(), Some("0.0.0.0:9006"));
    assert_eq!(host_port("https://h/").as_deref(), Some("h:443"));
    let l = load(
        "Clusters:\n  zzzzz:\n    Services:\n      DispatchCloud:\n        InternalURLs:\n          \"http://a:1/\": {}\n          \"http://b:2/\": {}\n",
    );
    assert_eq!(l.listen.as_deref(), Some("http://a:1/"));
    assert_eq!(count_matching(&l.warnings, "2 URLs are configured"), 1);
    let l = load(
        "Clusters:\n  zzzzz:\n    Services:\n      Controller:\n        InternalURLs:\n          \"http://ctrl:8003/\": {}\n",
    );
    assert_eq!(l.controller_url.as_deref(), Some("http://ctrl:8003/"));
}

#[test]
fn loopback_synthesizes_a_localhost_type() {
    let l =
        load("Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: loopback\n");
    assert_eq!(l.core.instance_types.len(), 1);
    let t = &l.core.instance_types["localhost"];
    assert_eq!(t.provider_type, "localhost");
    assert!(t.vcpus >= 1 && t.ram > 0 && t.scratch > 0);
    assert_eq!(t.price, 1.0);
    assert_eq!(t.quota_group, "");

    let l = load(
        "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: loopback\n    InstanceTypes:\n      only: {VCPUs: 2, RAM: 2GiB}\n",
    );
    assert_eq!(l.core.instance_types.keys().collect::<Vec<_>>(), ["only"]);
}

// ---------------------------------------------------------------------------------------------
// Secrets.

const SYSTEM_TOKEN: &str = "SeCrEtSyStEmRoOtToKeN0123456789abcdefXYZ";
const MGMT_TOKEN: &str = "SeCrEtMaNaGeMeNtToKeN0123456789abcdefXYZ";
const PEM_LINE: &str = "SeCrEtPeMbOdYlInE0123456789";
const CLOUD_SECRET: &str = "SeCrEtClOuDcReDeNtIaL0123456789";

fn assert_no_secret(text: &str) {
    for s in [SYSTEM_TOKEN, MGMT_TOKEN, PEM_LINE, CLOUD_SECRET, "SeCrEt"] {
        assert!(!text.contains(s), "a secret ({s}) leaked into: {text}");
    }
}

#[test]
fn secrets_never_appear_in_warnings_debug_or_summary() {
    let text = format!(
        "Clusters:
  zzzzz:
    SystemRootToken: {SYSTEM_TOKEN}
    ManagementToken: {MGMT_TOKEN}
    Containers:
      DispatchPrivateKey: |
        -----BEGIN RSA PRIVATE KEY-----
        {PEM_LINE}
        -----END RSA PRIVATE KEY-----
      CloudVMs:
        Bogus: {CLOUD_SECRET}
        DriverParameters:
          Region: us-east-1
          SecretAccessKey: {CLOUD_SECRET}
    InstanceTypes:
      t: {{VCPUs: 1, RAM: 1GiB, Scratch: 1GB}}
"
    );
    let l = load(&text);
    assert_eq!(l.secrets.system_root_token, SYSTEM_TOKEN);
    assert_eq!(l.secrets.management_token, MGMT_TOKEN);
    assert!(l.secrets.dispatch_private_key.contains(PEM_LINE));
    assert_eq!(l.driver_parameters["SecretAccessKey"], CLOUD_SECRET);
    assert!(!l.warnings.is_empty());
    for w in &l.warnings {
        assert_no_secret(w);
    }
    assert_no_secret(&format!("{l:?}"));
    assert_no_secret(&format!("{:?}", l.secrets));

    let f = TempFile::new(&text);
    let (code, stdout, stderr) = check_config(&f.path);
    assert_eq!(code, 0, "{stderr}");
    assert_no_secret(&stdout);
    assert_no_secret(&stderr);
}

#[test]
fn malformed_secrets_are_named_but_not_shown() {
    let cases = [
        format!("Clusters:\n  zzzzz:\n    SystemRootToken: [{SYSTEM_TOKEN}]\n"),
        format!("Clusters:\n  zzzzz:\n    ManagementToken: {{a: {MGMT_TOKEN}}}\n"),
        format!("Clusters:\n  zzzzz:\n    Containers:\n      DispatchPrivateKey: [{PEM_LINE}]\n"),
        format!("Clusters:\n  zzzzz:\n    Dispatch:\n      PrivateKey: {{k: {PEM_LINE}}}\n"),
        format!(
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        DriverParameters: {CLOUD_SECRET}\n"
        ),
        format!(
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        DriverParameters:\n          InstanceTypeQuotaGroups:\n            a: [{CLOUD_SECRET}]\n"
        ),
    ];
    let paths = [
        "Clusters.zzzzz.SystemRootToken: expected a string",
        "Clusters.zzzzz.ManagementToken: expected a string",
        "Clusters.zzzzz.Containers.DispatchPrivateKey: expected a string",
        "Clusters.zzzzz.Dispatch.PrivateKey: expected a string",
        "Clusters.zzzzz.Containers.CloudVMs.DriverParameters: expected a mapping",
        "Clusters.zzzzz.Containers.CloudVMs.DriverParameters.InstanceTypeQuotaGroups.a: expected a string",
    ];
    for (text, path) in cases.iter().zip(paths) {
        let err = load_err(text);
        assert!(err.starts_with(path), "want {path}, got {err}");
        assert_no_secret(&err);
    }

    // Tokens with odd characters or too short are warned about, by name only.
    let l = load(
        "Clusters:\n  zzzzz:\n    SystemRootToken: SeCrEt_with_underscores_0123456789\n    ManagementToken: SeCrEtShort\n",
    );
    assert!(l.warnings.contains(&"Clusters.zzzzz.SystemRootToken: unacceptable characters in token (only a-z, A-Z, 0-9 are acceptable)".to_string()), "{:#?}", l.warnings);
    assert!(l.warnings.contains(&"Clusters.zzzzz.ManagementToken: token is too short (should be at least 32 characters)".to_string()), "{:#?}", l.warnings);
    for w in &l.warnings {
        assert_no_secret(w);
    }
}

// ---------------------------------------------------------------------------------------------

/// Hex MD5, formatted with `{:x}`, so the tests need no second implementation detail.
struct Md5Hex<'a>(&'a str);

impl std::fmt::LowerHex for Md5Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use md5::Digest;
        for b in md5::Md5::digest(self.0.as_bytes()) {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
