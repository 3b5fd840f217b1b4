//! The files under `deploy/` are well-formed, and the JetStream definitions are what the
//! functions themselves create.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::{self, kv, stream};
use jetfn::store::{EventStore, StoreSettings};
use jetfn_cli::deploy::files::{self, Declared, Resource};
use jetfn_tests::{FunctionProcess, NatsServer};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The password variables `deploy/nats/permissions.conf` reads from nats-server's environment.
const PASSWORD_VARIABLES: &[&str] = &[
    "JETFN_ACCOUNT_PASSWORD",
    "JETFN_BANK_PASSWORD",
    "JETFN_SIGNUP_PASSWORD",
    "JETFN_ACCOUNT_BALANCES_PASSWORD",
    "JETFN_CLIENT_PASSWORD",
    "JETFN_DEPLOY_PASSWORD",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

/// Every file under `dir`, recursively, in name order.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn with_extension(extension: &str) -> Vec<PathBuf> {
    files_under(&deploy_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The resource definitions of `deploy/jetstream`, read by `jetfn deploy`'s own reader (which
/// refuses unknown kinds and fields, wrong types and a resource declared twice).
fn definitions() -> Vec<Declared> {
    files::load(&deploy_dir().join("jetstream")).unwrap()
}

/// The fields of the definition labelled `label` (`stream NAME`, `kv BUCKET`).
fn definition(label: &str) -> Map<String, Value> {
    definitions()
        .into_iter()
        .find(|d| d.resource.label() == label)
        .map(|d| match d.resource {
            Resource::Stream { config, .. }
            | Resource::Kv { config, .. }
            | Resource::Consumer { config, .. } => config,
        })
        .unwrap_or_else(|| panic!("no definition of {label} in deploy/jetstream"))
}

/// A stream definition as `jetfn deploy` creates it.
fn stream_definition(name: &str) -> stream::Config {
    files::stream_config(&definition(&format!("stream {name}"))).unwrap()
}

/// A bucket definition as `jetfn deploy` creates it.
fn kv_definition(bucket: &str) -> kv::Config {
    files::kv_config(&definition(&format!("kv {bucket}"))).unwrap()
}

/// The account function's store settings with jetfn's defaults, over `client`.
fn default_account_store(client: async_nats::Client) -> EventStore {
    let config = jetfn::Config::default();
    EventStore::new(
        client,
        StoreSettings {
            aggregate: "account".into(),
            stream: "ACCOUNT_EVENTS".into(),
            subject_prefix: "evt.account".into(),
            replicas: config.stream.replicas,
            duplicate_window: config.stream.duplicate_window,
            max_bytes: config.stream.max_bytes,
            timeout: config.nats.request_timeout,
            api_prefix: config.nats.jetstream_api(),
        },
    )
}

/// A stream's configuration as the server holds it, without the server's own `_nats.*`
/// metadata.
async fn server_config(js: &jetstream::Context, name: &str) -> stream::Config {
    let mut stream = js.get_stream(name).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.metadata.retain(|key, _| !key.starts_with("_nats."));
    config
}

#[test]
fn every_json_file_under_deploy_parses() {
    let files = with_extension("json");
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        json_file(&file);
    }
}

#[test]
fn every_jetstream_definition_has_a_kind_and_a_typed_config() {
    let definitions = definitions();
    assert!(definitions.len() >= 3, "{definitions:?}");
    for declared in definitions {
        let shown = declared.file.display();
        let label = declared.resource.label();
        if let Resource::Stream { config, .. } = &declared.resource {
            let stream = files::stream_config(config).unwrap();
            assert!(
                !stream.subjects.is_empty(),
                "{shown}: the stream has no subjects"
            );
        }
        let file_name = declared
            .file
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            label.ends_with(&file_name),
            "{shown}: the file should be named after {label}"
        );
    }
}

/// The definitions follow the format `jetfn deploy` documents, `resource.schema.json`.
#[test]
fn every_jetstream_definition_follows_the_resource_schema() {
    let schema = json_file(&deploy_dir().join("jetstream").join("resource.schema.json"));
    let validator = jsonschema::validator_for(&schema).unwrap();
    for declared in definitions() {
        let value = json_file(&declared.file);
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", declared.file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_events_definition_is_what_the_runtime_provisions() {
    let nats = NatsServer::start().await.unwrap();
    let store = default_account_store(nats.connect().await.unwrap());
    assert_eq!(stream_definition("ACCOUNT_EVENTS"), store.stream_config());

    let ledger = kv_definition("jetfn-ledger-account");
    let defaults = jetfn::Config::default();
    assert_eq!(ledger.history, 1);
    assert_eq!(ledger.max_age, defaults.ledger.ttl);
    assert_eq!(ledger.num_replicas, defaults.ledger.replicas);
    assert_eq!(ledger.storage, stream::StorageType::File);

    let snapshots = kv_definition("jetfn-snapshots-account");
    assert_eq!(snapshots.history, 1);
    assert_eq!(snapshots.num_replicas, defaults.stream.replicas);
    assert_eq!(snapshots.storage, stream::StorageType::File);
}

/// A deploy step creates the resources from the files; then the functions start (provisioning
/// on, as by default) and find nothing to change. Any difference between a file and what the
/// runtime wants would show up as a changed configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_created_from_the_definitions_are_left_alone_by_the_functions() {
    jetfn_tests::init_tracing();
    let nats = NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());
    js.create_stream(stream_definition("ACCOUNT_EVENTS"))
        .await
        .unwrap();
    js.create_stream(stream_definition("JETFN_DLQ"))
        .await
        .unwrap();
    for bucket in ["jetfn-ledger-account", "jetfn-snapshots-account"] {
        js.create_key_value(kv_definition(bucket)).await.unwrap();
    }
    let names = [
        "ACCOUNT_EVENTS",
        "JETFN_DLQ",
        "KV_jetfn-ledger-account",
        "KV_jetfn-snapshots-account",
    ];
    let mut before = Vec::new();
    for name in names {
        before.push(server_config(&js, name).await);
    }

    let mut config = jetfn::Config::default();
    config.nats.url = nats.url();
    let function = jetfn::command_function::<account::Account>()
        .with_config(config.clone())
        .start()
        .await
        .unwrap();
    // What a projection does to the dead-letter stream at start-up.
    jetfn::projection::DeadLetters::connect(&config)
        .await
        .unwrap();

    for (name, before) in names.into_iter().zip(before) {
        assert_eq!(server_config(&js, name).await, before, "{name} was changed");
    }
    function.stop().await.unwrap();
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = with_extension("yaml");
    files.extend(with_extension("yml"));
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let shown = file.display();
        let text = read(&file);
        let mut documents = 0;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{shown}: {e}"));
            documents += 1;
            // Kubernetes objects name their type and themselves.
            assert!(value["apiVersion"].is_string(), "{shown}: no apiVersion");
            assert!(value["kind"].is_string(), "{shown}: no kind");
            assert!(
                value["metadata"]["name"].is_string(),
                "{shown}: no metadata.name"
            );
        }
        assert!(documents > 0, "{shown}: no YAML document");
    }
}

/// The Kubernetes objects of `deploy/k8s`, by kind and name.
fn k8s_objects() -> Vec<serde_yaml_ng::Value> {
    let mut objects = Vec::new();
    for file in files_under(&deploy_dir().join("k8s")) {
        let text = read(&file);
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            objects
                .push(<serde_yaml_ng::Value as serde::Deserialize>::deserialize(document).unwrap());
        }
    }
    objects
}

#[test]
fn the_deployments_probe_the_health_port_and_mount_their_configuration() {
    let objects = k8s_objects();
    let deployments: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 2);
    for deployment in deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let spec = &deployment["spec"]["template"]["spec"];
        assert!(
            spec["terminationGracePeriodSeconds"].as_u64().is_some(),
            "{name}"
        );
        let container = &spec["containers"][0];
        let env = |key: &str| {
            container["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"] == key)
                .map(|e| e["value"].as_str().unwrap_or_default().to_owned())
        };
        assert_eq!(env("JETFN_HEALTH__PORT").as_deref(), Some("8080"), "{name}");
        let port = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "health")
            .unwrap();
        assert_eq!(port["containerPort"].as_u64(), Some(8080), "{name}");
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/livez",
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{name}"
        );

        // JETFN_CONFIG names jetfn.toml in a mounted ConfigMap, which exists.
        let config_path = env("JETFN_CONFIG").unwrap();
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{name}: {config_path} is not mounted"));
        let volume = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let map_name = volume["configMap"]["name"].as_str().unwrap();
        let map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
            .unwrap_or_else(|| panic!("{name}: no ConfigMap {map_name}"));
        assert!(map["data"]["jetfn.toml"].is_string(), "{name}");
        // The NATS creds come from a Secret, where the configuration looks for them.
        let toml = map["data"]["jetfn.toml"].as_str().unwrap();
        let secret_mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| {
                let volume = spec["volumes"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap();
                volume["secret"]["secretName"].is_string()
            })
            .unwrap_or_else(|| panic!("{name}: no Secret mounted"));
        let creds_dir = secret_mount["mountPath"].as_str().unwrap();
        assert!(
            toml.contains(&format!("creds_file = \"{creds_dir}/nats.creds\"")),
            "{name}: {toml}"
        );
    }
}

/// Each ConfigMap's jetfn.toml is a configuration the functions accept: the binary reads it
/// (unknown keys and bad values would stop it with `configuration: ...`) and gets as far as the
/// creds file, which exists only in the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmaps_hold_configurations_the_functions_accept() {
    let objects = k8s_objects();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (map_name, binary) in [
        ("account-config", "account"),
        ("account-projection-config", "account-projection"),
    ] {
        let map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
            .unwrap();
        let path = dir.path().join(format!("{map_name}.toml"));
        std::fs::write(&path, map["data"]["jetfn.toml"].as_str().unwrap()).unwrap();
        let mut process =
            FunctionProcess::spawn(binary, &[("JETFN_CONFIG", path.display().to_string())])
                .unwrap();
        let status = process.wait(Duration::from_secs(30)).await.unwrap();
        let log = process.log();
        assert!(!status.success(), "{binary}: {log}");
        assert!(!log.contains("configuration:"), "{binary}: {log}");
        assert!(log.contains("nats.creds_file"), "{binary}: {log}");
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn the_keda_trigger_names_a_projection_consumer() {
    let objects = k8s_objects();
    let scaled = objects
        .iter()
        .find(|o| o["kind"] == "ScaledObject")
        .expect("a KEDA ScaledObject");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "nats-jetstream");
    // With 4 partitions the live consumers read the partitioned view.
    assert_eq!(
        trigger["metadata"]["stream"],
        jetfn::wire::names::partition_view("ACCOUNT_EVENTS", "account", 4)
    );
    // The live consumer of partition 0, whose name survives rebuilds.
    assert_eq!(
        trigger["metadata"]["consumer"],
        jetfn::wire::names::live_projection_consumer("account-balances", 0)
    );
    let target = scaled["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
    assert!(
        objects
            .iter()
            .any(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == target),
        "no Deployment {target}"
    );
}

/// Runs `nats-server -c <file> -t` (test the configuration, start nothing).
fn nats_config_test(file: &Path) -> std::process::Output {
    let mut command = Command::new(jetfn_tests::nats_server_binary().unwrap());
    command.arg("-c").arg(file).arg("-t");
    for variable in PASSWORD_VARIABLES {
        command.env(variable, "not-a-real-password");
    }
    command.output().unwrap()
}

#[test]
fn every_nats_server_configuration_passes_the_config_test() {
    let files = with_extension("conf");
    assert!(files.len() >= 6, "{files:?}");
    for file in files {
        let output = nats_config_test(&file);
        assert!(
            output.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The server configurations also hold with their commented-out `include` of the permissions
/// switched on (tested on a copy of deploy/nats, so the relative include paths still resolve).
#[test]
fn the_server_configurations_accept_the_permissions_include() {
    let source = deploy_dir().join("nats");
    let copy = tempfile::tempdir().unwrap();
    let mut with_include = 0;
    for file in files_under(&source) {
        let relative = file.strip_prefix(&source).unwrap();
        let target = copy.path().join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let text = read(&file);
        let enabled = text.replace("# include ", "include ");
        if enabled != text {
            with_include += 1;
        }
        std::fs::write(&target, enabled).unwrap();
    }
    assert!(
        with_include >= 4,
        "dev.conf and the cluster nodes offer the include"
    );
    for file in files_under(copy.path()) {
        let text = read(&file);
        if !text.contains("include ") {
            continue;
        }
        let output = nats_config_test(&file);
        assert!(
            output.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_systemd_unit_has_unit_service_and_install_sections() {
    let units = with_extension("service");
    assert!(!units.is_empty());
    for unit in units {
        let text = read(&unit);
        let sections: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('[') && l.ends_with(']'))
            .collect();
        for wanted in ["[Unit]", "[Service]", "[Install]"] {
            assert!(
                sections.contains(&wanted),
                "{}: no {wanted}",
                unit.display()
            );
        }
        assert!(
            text.contains("\nExecStart="),
            "{}: no ExecStart",
            unit.display()
        );
    }
}
