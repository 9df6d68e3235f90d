//! The Azure driver against a local ARM stand-in: an axum server on 127.0.0.1 replaying the
//! recorded responses in fixtures/azure/ and recording every request, so the tests can check
//! paths, `api-version`s, bodies and the bearer token, and the error kinds the core receives.
//! The `check-config` test needs no driver and runs in every build with the runtime.

#![cfg(feature = "runtime")]

use std::path::{Path, PathBuf};
use std::process::Command;

const CONFIG_SECRET: &str = "Zm9vYmFyYmF6cXV4LXRvcHNlY3JldA==";

/// A config file that is deleted on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("azure-check-config-{}-{n}.yml", std::process::id()));
        std::fs::write(&path, text).expect("write the config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_config(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

#[test]
fn check_config_names_missing_azure_keys() {
    let params = [
        ("SubscriptionID", "sub"),
        ("ClientID", "cid"),
        ("ClientSecret", CONFIG_SECRET),
        ("TenantID", "tid"),
        ("ResourceGroup", "rg"),
        ("Location", "centralus"),
        ("Network", "net"),
        ("Subnet", "subnet"),
        ("AdminUsername", "crunch"),
    ];
    let config = |skip: &str| {
        let mut dp = String::new();
        for (k, v) in params.iter().filter(|(k, _)| *k != skip) {
            dp.push_str(&format!("          {k}: \"{v}\"\n"));
        }
        format!(
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        Driver: azure\n        DriverParameters:\n{dp}    InstanceTypes:\n      t1: {{ProviderType: Standard_D2s_v3, VCPUs: 2, RAM: 8GiB, Price: 0.1}}\n"
        )
    };
    let f = TempFile::new(&config(""));
    let (code, text) = check_config(&f.0);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains(CONFIG_SECRET), "{text}");
    for (key, _) in params {
        let f = TempFile::new(&config(key));
        let (code, text) = check_config(&f.0);
        assert_eq!(code, 2, "without {key}: {text}");
        let want = format!("Clusters.zzzzz.Containers.CloudVMs.DriverParameters.{key}: ");
        assert!(text.contains(&want), "without {key}: {text}");
        assert!(!text.contains(CONFIG_SECRET), "{text}");
    }
}

#[cfg(feature = "azure")]
mod driver {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use arvados_dispatch_cloud::cloud::azure::{
        Azure, AzureParams, COMPUTE_API_VERSION, DISK_API_VERSION, NETWORK_API_VERSION,
    };
    use arvados_dispatch_cloud::cloud::{
        CapacityScope, CloudErrorKind, CreateRequest, InstanceSet, new_instance_set,
    };
    use arvados_dispatch_cloud::core::time::Timestamp;
    use arvados_dispatch_cloud::core::types::InstanceType;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};

    const SUB: &str = "0b1f6471-1bf0-4dda-aec3-cb9272f09590";
    const RG: &str = "arvados-rg";
    const SECRET: &str = "cl1ent-s3cret/value+with=specials";
    const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOi.fake-arm-access-token.c2lnbmF0dXJl";
    const SET_ID: &str = "zzzzz-gj3su-000000000000001";
    /// 2024-05-01T12:00:00Z, the tests' clock.
    const NOW: Timestamp = Timestamp(1_714_564_800_000);

    /// One recorded request.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        query: String,
        auth: String,
        body: String,
    }

    impl Seen {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("a JSON body")
        }
    }

    /// A canned response.
    #[derive(Clone)]
    struct Canned {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    /// Answers requests whose method matches, whose path starts with `path` and whose query
    /// contains `query`: the responses in order, the last one repeated.
    struct Route {
        method: &'static str,
        path: String,
        query: &'static str,
        responses: VecDeque<Canned>,
    }

    #[derive(Default)]
    struct MockState {
        seen: Vec<Seen>,
        routes: Vec<Route>,
    }

    #[derive(Clone)]
    struct Mock {
        state: Arc<Mutex<MockState>>,
        base: String,
    }

    async fn handle(
        State(m): State<Mock>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let seen = Seen {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            auth: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let mut st = m.state.lock().expect("mock lock");
        let canned = st
            .routes
            .iter_mut()
            .find(|r| {
                r.method == seen.method
                    // ARM paths are case-insensitive.
                    && seen
                        .path
                        .to_ascii_lowercase()
                        .starts_with(&r.path.to_ascii_lowercase())
                    && seen.query.contains(r.query)
            })
            .map(|r| {
                if r.responses.len() > 1 {
                    r.responses.pop_front().expect("non-empty")
                } else {
                    r.responses[0].clone()
                }
            });
        st.seen.push(seen);
        let c = canned.unwrap_or(Canned {
            status: 599,
            headers: vec![],
            body: r#"{"error":{"code":"NoRoute","message":"no route in the test server"}}"#.into(),
        });
        let mut resp = (
            StatusCode::from_u16(c.status).expect("status"),
            [("content-type", "application/json")],
            c.body,
        )
            .into_response();
        for (k, v) in c.headers {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        resp
    }

    impl Mock {
        async fn start() -> Mock {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let m = Mock {
                state: Arc::default(),
                base,
            };
            let app = axum::Router::new().fallback(handle).with_state(m.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
            m.route(
                "POST",
                "/tenant-1/oauth2/v2.0/token",
                "",
                vec![ok("token.json")],
            );
            m
        }

        /// Adds a route (earlier routes win).
        fn route(&self, method: &'static str, path: &str, query: &'static str, r: Vec<Canned>) {
            self.state.lock().expect("mock lock").routes.push(Route {
                method,
                path: path.to_string(),
                query,
                responses: r.into(),
            });
        }

        /// Puts a route before the others.
        fn route_first(
            &self,
            method: &'static str,
            path: &str,
            query: &'static str,
            r: Vec<Canned>,
        ) {
            self.state.lock().expect("mock lock").routes.insert(
                0,
                Route {
                    method,
                    path: path.to_string(),
                    query,
                    responses: r.into(),
                },
            );
        }

        fn seen(&self) -> Vec<Seen> {
            self.state.lock().expect("mock lock").seen.clone()
        }

        fn arm_requests(&self) -> Vec<Seen> {
            self.seen()
                .into_iter()
                .filter(|s| s.path.starts_with("/subscriptions/"))
                .collect()
        }

        fn token_requests(&self) -> usize {
            self.seen()
                .iter()
                .filter(|s| s.path.ends_with("/oauth2/v2.0/token"))
                .count()
        }

        /// Waits (up to a generous deadline) until a request matching `f` was seen.
        async fn wait_for(&self, what: &str, f: impl Fn(&Seen) -> bool) -> Seen {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(s) = self.seen().into_iter().find(|s| f(s)) {
                    return s;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no {what} within 30 s; seen: {:#?}",
                    self.seen()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        fn params(&self) -> Value {
            json!({
                "SubscriptionID": SUB, "ClientID": "client-1", "ClientSecret": SECRET,
                "TenantID": "tenant-1", "ResourceGroup": RG, "Location": "centralus",
                "Network": "vnet1", "NetworkResourceGroup": "netrg", "Subnet": "subnet1",
                "ImageResourceGroup": "images", "AdminUsername": "crunch",
                "DeleteDanglingResourcesAfter": "1m",
                "ManagementEndpoint": self.base,
                "TokenEndpoint": format!("{}/tenant-1/oauth2/v2.0/token", self.base),
            })
        }

        fn driver_with(&self, params: Value) -> Azure {
            let p = AzureParams::from_driver_parameters("DriverParameters", &params)
                .expect("parameters parse");
            Azure::new(p, Some(SET_ID.to_string()), Arc::new(|| NOW)).expect("driver")
        }

        fn driver(&self) -> Azure {
            self.driver_with(self.params())
        }

        fn rg_path(&self, rest: &str) -> String {
            format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/{rest}")
        }
    }

    /// A fixture's text with the placeholders filled in.
    fn fixture(name: &str, base: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/azure/");
        std::fs::read_to_string(format!("{path}{name}"))
            .expect("fixture exists")
            .replace("{{base}}", base)
            .replace("{{sub}}", SUB)
            .replace("{{rg}}", RG)
            .replace("{{RG}}", &RG.to_ascii_uppercase())
    }

    fn canned(status: u16, headers: &[(&str, &str)], body: String) -> Canned {
        Canned {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }

    fn ok(name: &str) -> Canned {
        canned(200, &[], fixture(name, ""))
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn our_tags() -> BTreeMap<String, String> {
        tags(&[
            ("ArvadosInstanceSetID", SET_ID),
            ("ArvadosInstanceType", "d2"),
            ("ArvadosIdleBehavior", "run"),
            (
                "ArvadosInstanceSecret",
                "0123456789abcdef0123456789abcdef01234567",
            ),
        ])
    }

    fn request(preemptible: bool, image: &str) -> CreateRequest {
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]),
        );
        CreateRequest {
            instance_type: Arc::new(InstanceType {
                name: "d2".into(),
                provider_type: "Standard_D2s_v3".into(),
                vcpus: 2,
                ram: 8 << 30,
                preemptible,
                ..Default::default()
            }),
            image_id: image.into(),
            tags: our_tags(),
            init_command: "echo 'secret' > /var/run/arvados-instance-secret".into(),
            public_key: Some(key.public_key().clone()),
        }
    }

    /// Routes for a NIC create (200) and a VM create (201 + Azure-AsyncOperation polled twice).
    fn create_routes(m: &Mock) {
        let nic_prefix = m.rg_path("Microsoft.Network/networkInterfaces/compute-");
        m.route("PUT", &nic_prefix, "", vec![ok("nic-create.json")]);
        let op = format!(
            "{}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/centralus/operations/9a8b7c6d",
            m.base
        );
        m.route(
            "GET",
            &format!("/subscriptions/{SUB}/providers/Microsoft.Compute/locations/"),
            "",
            vec![
                canned(
                    200,
                    &[("Retry-After", "0")],
                    fixture("async-inprogress.json", ""),
                ),
                canned(
                    200,
                    &[("Retry-After", "0")],
                    fixture("async-succeeded.json", ""),
                ),
            ],
        );
        m.route(
            "PUT",
            &m.rg_path("Microsoft.Compute/virtualMachines/compute-"),
            "",
            vec![canned(
                201,
                &[("Azure-AsyncOperation", &op), ("Retry-After", "0")],
                fixture("vm-create-201.json", ""),
            )],
        );
        m.route(
            "GET",
            &m.rg_path("Microsoft.Compute/virtualMachines/compute-"),
            "",
            vec![canned(200, &[], fixture("vm-create-201.json", ""))],
        );
    }

    fn decode_base64(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
        let mut out = Vec::new();
        for ch in bytes.chunks(4) {
            let n = ch
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | (u32::from(v) << (18 - 6 * i)));
            for i in 0..ch.len().saturating_sub(1) {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }

    #[tokio::test]
    async fn create_puts_nic_then_vm_and_polls_the_operation() {
        let m = Mock::start().await;
        create_routes(&m);
        let az = m.driver();
        let info = az
            .create(request(false, "arvados-image-1"))
            .await
            .expect("create");

        // The token was fetched once, with the client credentials as a form.
        let token_req = m
            .seen()
            .into_iter()
            .find(|s| s.path == "/tenant-1/oauth2/v2.0/token")
            .expect("token request");
        assert!(token_req.body.contains("grant_type=client_credentials"));
        assert!(token_req.body.contains("client_id=client-1"));
        assert!(
            token_req
                .body
                .contains("client_secret=cl1ent-s3cret%2Fvalue%2Bwith%3Dspecials"),
            "{}",
            token_req.body
        );
        assert!(
            token_req
                .body
                .contains("scope=https%3A%2F%2Fmanagement.azure.com%2F.default")
        );
        assert_eq!(m.token_requests(), 1);

        let arm = m.arm_requests();
        let methods: Vec<&str> = arm.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(methods, ["PUT", "PUT", "GET", "GET"], "{arm:#?}");
        for s in &arm {
            assert_eq!(s.auth, format!("Bearer {TOKEN}"), "{s:?}");
        }

        // The NIC.
        let nic = &arm[0];
        let name = nic
            .path
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix("-nic"))
            .expect("NIC name")
            .to_string();
        let prefix = format!("compute-{SET_ID}-");
        assert!(name.starts_with(&prefix), "{name}");
        let suffix = &name[prefix.len()..];
        assert_eq!(suffix.len(), 15, "{name}");
        assert!(
            suffix
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(
            nic.path,
            m.rg_path(&format!("Microsoft.Network/networkInterfaces/{name}-nic"))
        );
        assert_eq!(nic.query, format!("api-version={NETWORK_API_VERSION}"));
        let body = nic.json();
        assert_eq!(body["location"], "centralus");
        assert_eq!(body["tags"]["ArvadosInstanceSetID"], SET_ID);
        assert_eq!(body["tags"]["created-at"], "2024-05-01T12:00:00Z");
        let ip = &body["properties"]["ipConfigurations"][0];
        assert_eq!(ip["name"], "ip1");
        assert_eq!(ip["properties"]["privateIPAllocationMethod"], "Dynamic");
        assert_eq!(
            ip["properties"]["subnet"]["id"],
            format!(
                "/subscriptions/{SUB}/resourceGroups/netrg/providers/Microsoft.Network/virtualnetworks/vnet1/subnets/subnet1"
            )
        );

        // The VM.
        let vm = &arm[1];
        assert_eq!(
            vm.path,
            m.rg_path(&format!("Microsoft.Compute/virtualMachines/{name}"))
        );
        assert_eq!(vm.query, format!("api-version={COMPUTE_API_VERSION}"));
        let body = vm.json();
        assert_eq!(body["tags"], nic.json()["tags"]);
        let p = &body["properties"];
        assert_eq!(p["hardwareProfile"]["vmSize"], "Standard_D2s_v3");
        assert_eq!(
            p["storageProfile"]["imageReference"]["id"],
            format!(
                "/subscriptions/{SUB}/resourceGroups/images/providers/Microsoft.Compute/images/arvados-image-1"
            )
        );
        assert_eq!(p["storageProfile"]["osDisk"]["name"], format!("{name}-os"));
        assert_eq!(p["storageProfile"]["osDisk"]["createOption"], "FromImage");
        assert_eq!(
            p["networkProfile"]["networkInterfaces"][0]["id"],
            format!(
                "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkInterfaces/NAME-nic"
            ),
            "the NIC ID comes from the NIC's response"
        );
        assert_eq!(
            p["networkProfile"]["networkInterfaces"][0]["properties"]["primary"],
            true
        );
        let os = &p["osProfile"];
        assert_eq!(os["computerName"], name.as_str());
        assert_eq!(os["adminUsername"], "crunch");
        let custom = decode_base64(os["customData"].as_str().expect("customData"));
        assert_eq!(
            String::from_utf8(custom).expect("utf-8"),
            "#!/bin/sh\necho 'secret' > /var/run/arvados-instance-secret\n"
        );
        let linux = &os["linuxConfiguration"];
        assert_eq!(linux["disablePasswordAuthentication"], true);
        assert_eq!(
            linux["ssh"]["publicKeys"][0]["path"],
            "/home/crunch/.ssh/authorized_keys"
        );
        assert!(
            linux["ssh"]["publicKeys"][0]["keyData"]
                .as_str()
                .expect("keyData")
                .starts_with("ssh-ed25519 ")
        );
        assert!(p.get("priority").is_none());

        // Two polls of the operation, then nothing else.
        assert!(arm[2].path.contains("/operations/9a8b7c6d"));
        assert_eq!(arm[2].auth, format!("Bearer {TOKEN}"));

        // The result: the ID in lower case, the NIC's address, all the tags.
        assert_eq!(
            info.id,
            format!(
                "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/virtualmachines/name"
            )
        );
        assert_eq!(info.address, "10.1.2.3");
        assert_eq!(info.provider_type, "Standard_D2s_v3");
        assert_eq!(info.remote_user, "crunch");
        assert_eq!(info.tags["created-at"], "2024-05-01T12:00:00Z");
        assert_eq!(info.tags["ArvadosInstanceType"], "d2");
    }

    #[tokio::test]
    async fn create_spot_with_gallery_and_vhd_images() {
        let m = Mock::start().await;
        create_routes(&m);
        let mut params = m.params();
        params["SharedImageGalleryName"] = json!("gallery1");
        params["SharedImageGalleryImageVersion"] = json!("1.2.3");
        let az = m.driver_with(params);
        az.create(request(true, "img")).await.expect("create");
        let vm = m
            .arm_requests()
            .into_iter()
            .find(|s| s.method == "PUT" && s.path.contains("virtualMachines"))
            .expect("VM PUT")
            .json();
        let p = &vm["properties"];
        assert_eq!(p["priority"], "Spot");
        assert_eq!(p["evictionPolicy"], "Delete");
        assert_eq!(p["billingProfile"]["maxPrice"], -1);
        assert_eq!(
            p["storageProfile"]["imageReference"]["id"],
            format!(
                "/subscriptions/{SUB}/resourceGroups/images/providers/Microsoft.Compute/galleries/gallery1/images/img/versions/1.2.3"
            )
        );

        // A VHD image needs a blob container: without one, an error and the NIC is deleted.
        let m = Mock::start().await;
        create_routes(&m);
        m.route(
            "DELETE",
            &m.rg_path("Microsoft.Network/networkInterfaces/"),
            "",
            vec![canned(200, &[], String::new())],
        );
        let vhd = "https://acct.blob.core.windows.net/system/Microsoft.Compute/Images/images/x.vhd";
        let e = m
            .driver()
            .create(request(false, vhd))
            .await
            .expect_err("no blob container");
        assert_eq!(e.kind, CloudErrorKind::Permanent);
        assert!(e.message.contains("BlobContainer"), "{}", e.message);
        m.wait_for("NIC delete", |s| s.method == "DELETE").await;

        // With one, the OS disk comes from the image URI and goes to the container.
        let m = Mock::start().await;
        create_routes(&m);
        let mut params = m.params();
        params["StorageAccount"] = json!("acct");
        params["BlobContainer"] = json!("vhds");
        m.driver_with(params)
            .create(request(false, vhd))
            .await
            .expect("create");
        let vm = m
            .arm_requests()
            .into_iter()
            .find(|s| s.method == "PUT" && s.path.contains("virtualMachines"))
            .expect("VM PUT");
        let name = vm.path.rsplit('/').next().expect("name").to_string();
        let os = &vm.json()["properties"]["storageProfile"]["osDisk"];
        assert_eq!(os["image"]["uri"], vhd);
        assert_eq!(
            os["vhd"]["uri"],
            format!("https://acct.blob.core.windows.net/vhds/{name}-os.vhd")
        );
        assert!(
            vm.json()["properties"]["storageProfile"]
                .get("imageReference")
                .is_none()
        );
    }

    #[tokio::test]
    async fn list_pages_filters_and_deletes_dangling_nics() {
        let m = Mock::start().await;
        m.route(
            "GET",
            &m.rg_path("Microsoft.Network/networkInterfaces"),
            "",
            vec![ok("nic-list.json")],
        );
        m.route(
            "GET",
            &m.rg_path("Microsoft.Compute/virtualMachines"),
            "skiptoken=page2",
            vec![ok("vm-list-page2.json")],
        );
        m.route(
            "GET",
            &m.rg_path("Microsoft.Compute/virtualMachines"),
            "",
            vec![canned(200, &[], fixture("vm-list-page1.json", &m.base))],
        );
        m.route(
            "DELETE",
            &m.rg_path("Microsoft.Network/networkInterfaces/"),
            "",
            vec![canned(200, &[], String::new())],
        );
        let az = m.driver();
        let filter = tags(&[("ArvadosInstanceSetID", SET_ID)]);
        let list = az.list(&filter).await.expect("list");
        let got: Vec<(String, String, String, String)> = list
            .iter()
            .map(|i| {
                (
                    i.id.rsplit('/').next().expect("name").to_string(),
                    i.address.clone(),
                    i.provider_type.clone(),
                    i.tags["ArvadosIdleBehavior"].clone(),
                )
            })
            .collect();
        let a = "compute-zzzzz-gj3su-000000000000001-aaaaaaaaaaaaaaa";
        let b = "compute-zzzzz-gj3su-000000000000001-bbbbbbbbbbbbbbb";
        assert_eq!(
            got,
            [
                (
                    a.into(),
                    "10.1.0.4".into(),
                    "Standard_D2s_v3".into(),
                    "run".into()
                ),
                (
                    b.into(),
                    "10.1.0.5".into(),
                    "Standard_D4s_v3".into(),
                    "hold".into()
                ),
            ]
        );
        assert!(list.iter().all(|i| i.remote_user == "crunch"));
        assert!(list.iter().all(|i| i.id == i.id.to_ascii_lowercase()));
        assert_eq!(list[0].tags["created-at"], "2024-05-01T11:00:00.123456789Z");

        let gets: Vec<Seen> = m
            .arm_requests()
            .into_iter()
            .filter(|s| s.method == "GET")
            .collect();
        assert_eq!(gets.len(), 3, "{gets:#?}");
        assert_eq!(gets[0].query, format!("api-version={NETWORK_API_VERSION}"));
        assert_eq!(gets[1].query, format!("api-version={COMPUTE_API_VERSION}"));
        assert_eq!(
            gets[2].query,
            format!("api-version={COMPUTE_API_VERSION}&$skiptoken=page2")
        );
        assert!(gets.iter().all(|s| s.auth == format!("Bearer {TOKEN}")));

        // Only our old unattached NIC is deleted.
        let del = m
            .wait_for("dangling NIC delete", |s| s.method == "DELETE")
            .await;
        assert_eq!(
            del.path,
            m.rg_path(
                "Microsoft.Network/networkInterfaces/compute-zzzzz-gj3su-000000000000001-ccccccccccccccc-nic"
            )
        );
        assert_eq!(del.query, format!("api-version={NETWORK_API_VERSION}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deletes = m
            .arm_requests()
            .into_iter()
            .filter(|s| s.method == "DELETE")
            .count();
        assert_eq!(deletes, 1);

        // Without a filter, every VM is listed, and nothing is deleted as dangling.
        let m2 = Mock::start().await;
        m2.route(
            "GET",
            &m2.rg_path("Microsoft.Network/networkInterfaces"),
            "",
            vec![ok("nic-list.json")],
        );
        m2.route(
            "GET",
            &m2.rg_path("Microsoft.Compute/virtualMachines"),
            "skiptoken=page2",
            vec![ok("vm-list-page2.json")],
        );
        m2.route(
            "GET",
            &m2.rg_path("Microsoft.Compute/virtualMachines"),
            "",
            vec![canned(200, &[], fixture("vm-list-page1.json", &m2.base))],
        );
        let all = m2.driver().list(&BTreeMap::new()).await.expect("list");
        assert_eq!(all.len(), 4);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(m2.seen().iter().all(|s| s.method != "DELETE"));
    }

    #[tokio::test]
    async fn next_link_off_the_endpoint_is_refused() {
        let m = Mock::start().await;
        m.route(
            "GET",
            &m.rg_path("Microsoft.Network/networkInterfaces"),
            "",
            vec![ok("nic-list.json")],
        );
        m.route(
            "GET",
            &m.rg_path("Microsoft.Compute/virtualMachines"),
            "",
            vec![canned(
                200,
                &[],
                fixture("vm-list-page1.json", "https://elsewhere.invalid"),
            )],
        );
        let e = m
            .driver()
            .list(&BTreeMap::new())
            .await
            .expect_err("refused");
        assert_eq!(e.kind, CloudErrorKind::Permanent);
        assert!(e.message.contains("elsewhere.invalid"), "{}", e.message);
    }

    #[tokio::test]
    async fn destroy_deletes_vm_then_nic_and_disk() {
        let m = Mock::start().await;
        let a = "compute-zzzzz-gj3su-000000000000001-aaaaaaaaaaaaaaa";
        let vm_path = m.rg_path(&format!("Microsoft.Compute/virtualMachines/{a}"));
        let poll = format!(
            "{}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/centralus/operations/del1?monitor=true",
            m.base
        );
        m.route(
            "GET",
            &format!("/subscriptions/{SUB}/providers/Microsoft.Compute/locations/"),
            "",
            vec![
                canned(202, &[("Retry-After", "0")], String::new()),
                canned(200, &[], String::new()),
            ],
        );
        m.route("GET", &vm_path, "", vec![ok("vm-get.json")]);
        m.route(
            "DELETE",
            &vm_path,
            "",
            vec![canned(
                202,
                &[("Location", &poll), ("Retry-After", "0")],
                String::new(),
            )],
        );
        m.route(
            "DELETE",
            &m.rg_path(""),
            "",
            vec![canned(200, &[], String::new())],
        );
        let az = m.driver();
        // The ID as listed (lower case) works: ARM paths are case-insensitive.
        let id = vm_path.to_ascii_lowercase();
        az.destroy(&id).await.expect("destroy");
        let arm: Vec<(String, String, String)> = m
            .arm_requests()
            .into_iter()
            .map(|s| (s.method, s.path, s.query))
            .collect();
        let cv = format!("api-version={COMPUTE_API_VERSION}");
        assert_eq!(
            arm,
            [
                ("GET".into(), id.clone(), cv.clone()),
                ("DELETE".into(), id.clone(), cv),
                (
                    "GET".into(),
                    format!(
                        "/subscriptions/{SUB}/providers/Microsoft.Compute/locations/centralus/operations/del1"
                    ),
                    "monitor=true".into()
                ),
                (
                    "GET".into(),
                    format!(
                        "/subscriptions/{SUB}/providers/Microsoft.Compute/locations/centralus/operations/del1"
                    ),
                    "monitor=true".into()
                ),
                (
                    "DELETE".into(),
                    m.rg_path(&format!("Microsoft.Network/networkInterfaces/{a}-nic")),
                    format!("api-version={NETWORK_API_VERSION}")
                ),
                (
                    "DELETE".into(),
                    m.rg_path(&format!("Microsoft.Compute/disks/{a}-os")),
                    format!("api-version={DISK_API_VERSION}")
                ),
            ]
        );

        // An unknown VM is NotFound, and nothing is deleted.
        let m = Mock::start().await;
        m.route(
            "GET",
            &m.rg_path(""),
            "",
            vec![canned(404, &[], fixture("error-404.json", ""))],
        );
        let e = m
            .driver()
            .destroy(&m.rg_path("Microsoft.Compute/virtualMachines/compute-gone"))
            .await
            .expect_err("unknown");
        assert_eq!(e.kind, CloudErrorKind::NotFound);
        assert!(e.message.contains("ResourceNotFound"), "{}", e.message);
        assert!(m.seen().iter().all(|s| s.method != "DELETE"));
        let e = m.driver().destroy("not-an-id").await.expect_err("bad ID");
        assert_eq!(e.kind, CloudErrorKind::NotFound);
    }

    #[tokio::test]
    async fn set_tags_patches_the_full_map() {
        let m = Mock::start().await;
        let vm_path = m.rg_path("Microsoft.Compute/virtualMachines/compute-x");
        m.route("PATCH", &vm_path, "", vec![ok("vm-get.json")]);
        let mut t = our_tags();
        t.insert("ArvadosIdleBehavior".into(), "drain".into());
        m.driver()
            .set_tags(&vm_path, t.clone())
            .await
            .expect("set tags");
        let arm = m.arm_requests();
        assert_eq!(arm.len(), 1);
        assert_eq!(arm[0].method, "PATCH");
        assert_eq!(arm[0].query, format!("api-version={COMPUTE_API_VERSION}"));
        assert_eq!(arm[0].json(), json!({ "tags": t }));
    }

    /// Creates with the VM PUT answering `resp`, and returns the error.
    async fn create_error(resp: Canned) -> (Mock, arvados_dispatch_cloud::cloud::CloudError) {
        let m = Mock::start().await;
        m.route_first(
            "PUT",
            &m.rg_path("Microsoft.Compute/virtualMachines/"),
            "",
            vec![resp],
        );
        create_routes(&m);
        m.route(
            "DELETE",
            &m.rg_path(""),
            "",
            vec![canned(200, &[], String::new())],
        );
        let e = m
            .driver()
            .create(request(false, "img"))
            .await
            .expect_err("create fails");
        (m, e)
    }

    #[tokio::test]
    async fn create_errors_are_classified() {
        let secs = |s| NOW + Duration::from_secs(s);
        let (_, e) = create_error(canned(
            429,
            &[("Retry-After", "30")],
            fixture("error-429.json", ""),
        ))
        .await;
        assert_eq!(e.kind, CloudErrorKind::RateLimited { retry_at: secs(30) });
        assert!(e.message.contains("TooManyRequests"), "{}", e.message);

        let (_, e) = create_error(canned(
            429,
            &[("Retry-After", "Wed, 01 May 2024 12:05:00 GMT")],
            fixture("error-429.json", ""),
        ))
        .await;
        assert_eq!(
            e.kind,
            CloudErrorKind::RateLimited {
                retry_at: secs(300)
            }
        );

        // Go panics here; the default back-off applies instead.
        let (_, e) = create_error(canned(429, &[], fixture("error-429.json", ""))).await;
        assert_eq!(e.kind, CloudErrorKind::RateLimited { retry_at: secs(20) });

        let (m, e) = create_error(canned(409, &[], fixture("error-quota.json", ""))).await;
        assert_eq!(e.kind, CloudErrorKind::Quota);
        assert!(e.message.contains("exceeding approved"), "{}", e.message);
        // The NIC made for the VM is deleted.
        let del = m.wait_for("NIC delete", |s| s.method == "DELETE").await;
        assert!(del.path.contains("/networkInterfaces/compute-"), "{del:?}");

        let (_, e) = create_error(canned(409, &[], fixture("error-capacity.json", ""))).await;
        assert_eq!(
            e.kind,
            CloudErrorKind::Capacity(CapacityScope::InstanceType)
        );

        let (_, e) = create_error(canned(500, &[], fixture("error-500.json", ""))).await;
        assert_eq!(e.kind, CloudErrorKind::Transient);
    }

    #[tokio::test]
    async fn failed_operation_is_classified_and_cleaned_up() {
        let m = Mock::start().await;
        m.route_first(
            "GET",
            &format!("/subscriptions/{SUB}/providers/Microsoft.Compute/locations/"),
            "",
            vec![canned(
                200,
                &[],
                fixture("async-failed-allocation.json", ""),
            )],
        );
        create_routes(&m);
        m.route(
            "DELETE",
            &m.rg_path(""),
            "",
            vec![canned(200, &[], String::new())],
        );
        let e = m
            .driver()
            .create(request(false, "img"))
            .await
            .expect_err("allocation fails");
        assert_eq!(
            e.kind,
            CloudErrorKind::Capacity(CapacityScope::InstanceType)
        );
        assert!(e.message.contains("AllocationFailed"), "{}", e.message);
        // The VM, then its NIC and OS disk, are deleted in the background.
        m.wait_for("disk delete", |s| {
            s.method == "DELETE" && s.path.contains("/disks/")
        })
        .await;
        let deletes: Vec<String> = m
            .seen()
            .into_iter()
            .filter(|s| s.method == "DELETE")
            .map(|s| s.path.split('/').nth(7).unwrap_or_default().to_string())
            .collect();
        assert_eq!(deletes, ["virtualMachines", "networkInterfaces", "disks"]);
    }

    #[tokio::test]
    async fn token_errors_and_refresh_never_leak_the_secret() {
        // A rejected secret is Permanent, and the message does not contain it.
        let m = Mock::start().await;
        m.route_first(
            "POST",
            "/tenant-1/oauth2/v2.0/token",
            "",
            vec![canned(
                401,
                &[],
                fixture("token-error-invalid-client.json", ""),
            )],
        );
        let az = m.driver();
        let e = az.list(&BTreeMap::new()).await.expect_err("bad secret");
        assert_eq!(e.kind, CloudErrorKind::Permanent);
        assert!(e.message.contains("invalid_client"), "{}", e.message);
        assert!(!e.message.contains(SECRET), "{}", e.message);
        assert!(!format!("{az:?}").contains(SECRET));
        assert!(m.arm_requests().is_empty());

        // An expired token (401 from ARM) is fetched again once.
        let m = Mock::start().await;
        let vm_path = m.rg_path("Microsoft.Compute/virtualMachines/compute-x");
        m.route(
            "PATCH",
            &vm_path,
            "",
            vec![
                canned(401, &[], fixture("error-401.json", "")),
                ok("vm-get.json"),
            ],
        );
        m.driver()
            .set_tags(&vm_path, our_tags())
            .await
            .expect("set tags after a refresh");
        assert_eq!(m.token_requests(), 2);
        assert_eq!(m.arm_requests().len(), 2);

        // Every error message and the driver's Debug are free of the secret and the token.
        let m = Mock::start().await;
        m.route(
            "GET",
            &m.rg_path(""),
            "",
            vec![canned(
                400,
                &[],
                format!(
                    r#"{{"error":{{"code":"Echo","message":"you sent {TOKEN} and {SECRET}"}}}}"#
                ),
            )],
        );
        let az = m.driver();
        let e = az.list(&BTreeMap::new()).await.expect_err("400");
        assert_eq!(e.kind, CloudErrorKind::Permanent);
        assert!(
            !e.message.contains(TOKEN) && !e.message.contains(SECRET),
            "{}",
            e.message
        );
        assert!(e.message.contains("<redacted>"), "{}", e.message);
    }

    #[tokio::test]
    async fn new_instance_set_builds_the_azure_driver() {
        let m = Mock::start().await;
        m.route(
            "GET",
            &m.rg_path("Microsoft.Network/networkInterfaces"),
            "",
            vec![ok("nic-list.json")],
        );
        m.route(
            "GET",
            &m.rg_path("Microsoft.Compute/virtualMachines"),
            "",
            vec![ok("vm-list-page2.json")],
        );
        let set = new_instance_set("azure", &m.params())
            .await
            .expect("driver");
        let list = set
            .list(&tags(&[("ArvadosInstanceSetID", SET_ID)]))
            .await
            .expect("list");
        assert_eq!(list.len(), 1);
        let mut bad = m.params();
        bad.as_object_mut()
            .expect("object")
            .remove("SubscriptionID");
        let e = new_instance_set("azure", &bad)
            .await
            .err()
            .expect("missing SubscriptionID");
        assert!(
            e.to_string().contains("DriverParameters.SubscriptionID"),
            "{e}"
        );
    }
}
