//! The EC2 driver against moto's EC2 emulator (`moto_server` from PyPI `moto[server]`, which
//! scripts/test installs) on 127.0.0.1 at a free port: create with tags, list by tag, set tags,
//! destroy, key pair import and lookup by fingerprint, spot requests and the scratch volume.
//!
//! moto hands out instance addresses; nothing here connects to them. moto does not page
//! DescribeInstances unless asked to, so paging is covered by tests/ec2_errors.rs.
#![cfg(feature = "ec2")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arvados_dispatch_cloud::cloud::ec2::{Ec2, key_fingerprints};
use arvados_dispatch_cloud::cloud::{CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet};
use arvados_dispatch_cloud::core::types::InstanceType;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use russh::keys::PublicKey;

/// A generous bound on each call, so a hung call fails the test.
const DEADLINE: Duration = Duration::from_secs(60);
const SET_ID: &str = "zzzzz-gj3su-000000000000000";

/// A running moto_server, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP GET of `path` on 127.0.0.1:`port`; Some(status line) if the server answered.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.lines().next().map(str::to_string)
}

impl Moto {
    fn start() -> Moto {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local addr").port()
        };
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start moto_server ({e}): it comes from the PyPI package moto[server]; run scripts/test, which installs it"
            ),
        };
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = http_get(port, "/moto-api/")
                && status.contains(" 200")
            {
                return moto;
            }
            if let Ok(Some(st)) = moto.child.try_wait() {
                panic!("moto_server exited early with {st}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on 127.0.0.1:{port} within 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn driver(&self, extra: serde_json::Value) -> Ec2 {
        let mut params = serde_json::json!({
            "Region": "us-east-1",
            "AccessKeyID": "AKIDMOTO",
            "SecretAccessKey": "moto-secret",
            "Endpoint": self.endpoint(),
            "AdminUsername": "crunch",
        });
        if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), extra) {
            p.extend(e);
        }
        Ec2::from_driver_parameters(&params).expect("driver parameters")
    }

    /// A plain SDK client on moto, to look at what the driver did.
    fn client(&self) -> aws_sdk_ec2::Client {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKIDMOTO", "moto-secret", None, None, "t"))
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
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("finished before the deadline")
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn request(name: &str, provider_type: &str, extra_tags: &[(&str, &str)]) -> CreateRequest {
    let t = InstanceType {
        name: name.into(),
        provider_type: provider_type.into(),
        vcpus: 2,
        ram: 8 << 30,
        price: 0.1,
        ..Default::default()
    };
    let mut all = tags(&[
        ("ArvadosInstanceSetID", SET_ID),
        ("ArvadosInstanceType", name),
        ("ArvadosIdleBehavior", "run"),
        (
            "ArvadosInstanceSecret",
            "0123456789abcdef0123456789abcdef01234567",
        ),
    ]);
    all.extend(tags(extra_tags));
    CreateRequest {
        instance_type: Arc::new(t),
        image_id: "ami-12c6146b".into(),
        tags: all,
        init_command: "echo hello".into(),
        public_key: None,
    }
}

fn fixture_key(name: &str) -> PublicKey {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/ec2")
        .join(name);
    let text = std::fs::read_to_string(&p).expect("key fixture");
    PublicKey::from_openssh(text.trim()).expect("public key")
}

async fn describe(client: &aws_sdk_ec2::Client, id: &str) -> aws_sdk_ec2::types::Instance {
    let out = within(client.describe_instances().instance_ids(id).send())
        .await
        .expect("DescribeInstances");
    out.reservations()[0].instances()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_set_tags_destroy() {
    let moto = Moto::start();
    let d = moto.driver(serde_json::json!({}));
    let a = within(d.create(request("m5large", "m5.large", &[("Owner", "a")])))
        .await
        .expect("create a");
    let b = within(d.create(request("c5xl", "c5.xlarge", &[])))
        .await
        .expect("create b");
    assert!(a.id.starts_with("i-"), "{a:?}");
    assert_ne!(a.id, b.id);
    assert_eq!(a.provider_type, "m5.large");
    assert_eq!(a.remote_user, "crunch");
    assert_eq!(a.tags.get("Owner").map(String::as_str), Some("a"));
    // An instance of another dispatcher.
    let mut foreign = request("m5large", "m5.large", &[]);
    foreign
        .tags
        .insert("ArvadosInstanceSetID".into(), "other".into());
    let f = within(d.create(foreign)).await.expect("create foreign");

    let mine = tags(&[("ArvadosInstanceSetID", SET_ID)]);
    let listed = within(d.list(&mine)).await.expect("list");
    let mut ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort();
    assert_eq!(ids, want, "only our instances: {listed:?}");
    let la: &InstanceInfo = listed.iter().find(|i| i.id == a.id).expect("a listed");
    assert_eq!(la.tags, a.tags);
    assert_eq!(la.provider_type, "m5.large");
    assert!(!la.address.is_empty(), "moto gives a private address");
    // Two tag filters are both applied.
    let narrower = tags(&[("ArvadosInstanceSetID", SET_ID), ("Owner", "a")]);
    let listed = within(d.list(&narrower)).await.expect("list");
    assert_eq!(
        listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()]
    );

    // SetTags sends every tag with the changed values.
    let mut changed = a.tags.clone();
    changed.insert("ArvadosIdleBehavior".into(), "hold".into());
    within(d.set_tags(&a.id, changed.clone()))
        .await
        .expect("set tags");
    let listed = within(d.list(&mine)).await.expect("list");
    let la = listed.iter().find(|i| i.id == a.id).expect("a listed");
    assert_eq!(la.tags, changed);

    // Destroyed instances disappear from the list (moto terminates at once).
    within(d.destroy(&b.id)).await.expect("destroy");
    let listed = within(d.list(&mine)).await.expect("list");
    assert_eq!(
        listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()]
    );
    let err = within(d.destroy("i-0000000000000dead"))
        .await
        .expect_err("unknown instance");
    assert_eq!(err.kind, CloudErrorKind::NotFound, "{err}");

    // What RunInstances asked for, as moto recorded it.
    let inst = describe(&moto.client(), &a.id).await;
    assert_eq!(inst.instance_lifecycle(), None, "on-demand");
    assert_eq!(
        inst.metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    within(d.destroy(&a.id)).await.expect("destroy a");
    within(d.destroy(&f.id)).await.expect("destroy foreign");
    within(d.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_pairs_are_imported_once_and_found_by_fingerprint() {
    let moto = Moto::start();
    let client = moto.client();
    let rsa = fixture_key("test-key-rsa.pub");
    let fps = key_fingerprints(&rsa).expect("fingerprints");
    assert_eq!(fps[0], "33:7e:5c:42:92:fc:b4:77:65:93:b8:2d:90:47:78:43");
    assert_eq!(
        fps[1],
        "b4:29:5f:ce:cf:c4:8e:b8:ec:11:1b:c7:e3:d0:cb:4c:d4:88:84:6b"
    );

    let d = moto.driver(serde_json::json!({}));
    let mut req = request("m5large", "m5.large", &[]);
    req.public_key = Some(rsa.clone());
    let a = within(d.create(req.clone()))
        .await
        .expect("create with key");
    let name = format!("arvados-dispatch-keypair-{}", fps[0]);
    assert_eq!(
        describe(&client, &a.id).await.key_name(),
        Some(name.as_str())
    );
    let pairs = within(client.describe_key_pairs().send())
        .await
        .expect("DescribeKeyPairs");
    let names: Vec<&str> = pairs
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name())
        .collect();
    assert_eq!(names, [name.as_str()]);
    assert_eq!(
        pairs.key_pairs()[0].key_fingerprint(),
        Some(fps[0].as_str())
    );

    // A new driver (empty cache) finds the same key pair by fingerprint instead of importing
    // it again (a second import of the name would fail).
    let d2 = moto.driver(serde_json::json!({}));
    let b = within(d2.create(req)).await.expect("create again");
    assert_eq!(
        describe(&client, &b.id).await.key_name(),
        Some(name.as_str())
    );

    // An Ed25519 key is imported under its SHA256 fingerprint, once per driver. (moto records
    // a colon-hex SHA-256 of the DER key as the fingerprint of an Ed25519 key where EC2 records
    // the base64 form, so the lookup by fingerprint cannot find it there; RSA covers lookups.)
    let ed = fixture_key("test-key-ed25519.pub");
    let ed_fps = key_fingerprints(&ed).expect("fingerprints");
    assert_eq!(
        ed_fps,
        [
            "SHA256:JaTKBcA9jm7K2yoHcIopXnfmOj5r8SlvYChLcnSJz10",
            "SHA256:JaTKBcA9jm7K2yoHcIopXnfmOj5r8SlvYChLcnSJz10="
        ]
    );
    let ed_name = format!("arvados-dispatch-keypair-{}", ed_fps[0]);
    let mut req = request("m5large", "m5.large", &[]);
    req.public_key = Some(ed);
    for _ in 0..2 {
        let c = within(d2.create(req.clone()))
            .await
            .expect("create with ed25519 key");
        assert_eq!(
            describe(&client, &c.id).await.key_name(),
            Some(ed_name.as_str())
        );
    }
    let pairs = within(client.describe_key_pairs().send())
        .await
        .expect("DescribeKeyPairs");
    let mut names: Vec<&str> = pairs
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name())
        .collect();
    names.sort();
    let mut want = vec![name.as_str(), ed_name.as_str()];
    want.sort();
    assert_eq!(names, want);

    // A third driver (empty cache) misses the Ed25519 key pair by fingerprint on moto, and its
    // import gets InvalidKeyPair.Duplicate: the key pair of that name is this key, and is used.
    let d3 = moto.driver(serde_json::json!({}));
    let c = within(d3.create(req))
        .await
        .expect("create with the Ed25519 key another driver imported");
    assert_eq!(
        describe(&client, &c.id).await.key_name(),
        Some(ed_name.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_request_and_scratch_volume() {
    let moto = Moto::start();
    let client = moto.client();
    let d = moto.driver(serde_json::json!({"EBSVolumeType": "gp3"}));
    let mut req = request("m5large.preemptible", "m5.large", &[]);
    let mut t = (*req.instance_type).clone();
    t.preemptible = true;
    t.added_scratch = 100 << 30;
    req.instance_type = Arc::new(t);
    let a = within(d.create(req)).await.expect("create spot");
    let inst = describe(&client, &a.id).await;
    assert_eq!(
        inst.instance_lifecycle().map(|l| l.as_str()),
        Some("spot"),
        "{inst:?}"
    );
    let scratch = inst
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some("/dev/xvdt"))
        .unwrap_or_else(|| panic!("no /dev/xvdt in {inst:?}"));
    let volume_id = scratch
        .ebs()
        .and_then(|e| e.volume_id())
        .expect("volume id");
    let vols = within(client.describe_volumes().volume_ids(volume_id).send())
        .await
        .expect("DescribeVolumes");
    let v = &vols.volumes()[0];
    assert_eq!(v.size(), Some(100));
    assert_eq!(v.volume_type().map(|t| t.as_str()), Some("gp3"));

    // Listing a spot instance also looks up zones (DescribeInstanceStatus) and spot prices
    // (DescribeSpotPriceHistory; SpotPriceUpdateInterval defaults to 24h). moto's price
    // records are dated 2006 and described as "Linux/UNIX (Amazon VPC)", so none match the
    // reference's filter and the instance has no history (tests/ec2_errors.rs covers prices).
    let listed = within(d.list(&BTreeMap::new())).await.expect("list");
    let mine = listed
        .iter()
        .find(|i| i.id == a.id)
        .expect("the spot instance is listed");
    assert!(mine.price_history.is_empty(), "{mine:?}");
}
