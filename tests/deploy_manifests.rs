//! Offline checks of the deployment files: the Kubernetes sidecar example under
//! `deploy/kubernetes/` and the `Dockerfile`.
//!
//! No cluster and no Docker engine are needed: the manifests are parsed as YAML, checked
//! for the structure Kubernetes requires and for consistency with each other, and the
//! `proxy.yaml` embedded in the ConfigMap is loaded with the proxy's own configuration
//! loader, together with the environment the container would really see (the image's
//! `ENV` plus the Deployment's `env`, values resolved from the Secret).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use session_proxy::config::{Config, ConfigError, Overrides, StoreType};
use session_proxy::session::exclude::Exclusions;

// ---------------------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest_dir() -> PathBuf {
    repo_root().join("deploy").join("kubernetes")
}

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every non-empty YAML document of every `*.yaml` / `*.yml` file under deploy/kubernetes/.
fn documents() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .expect("deploy/kubernetes/ exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files under deploy/kubernetes/");

    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("readable manifest");
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
        docs.extend(
            values
                .into_iter()
                .filter(|v| !v.is_null())
                .map(|value| Doc {
                    file: file.clone(),
                    value,
                }),
        );
    }
    docs
}

/// The one document of `kind`.
fn the(docs: &[Doc], kind: &str) -> Value {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0].value.clone()
}

fn the_named(docs: &[Doc], kind: &str, name: &str) -> Value {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} named `{name}` in deploy/kubernetes/"))
        .value
        .clone()
}

fn array<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} must be a list, is {value}"))
}

fn string<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} must be a string, is {value}"))
}

fn number(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what} must be a non-negative integer, is {value}"))
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

fn containers(deployment: &Value) -> &Vec<Value> {
    array(
        &pod_spec(deployment)["containers"],
        "spec.template.spec.containers",
    )
}

/// The container running the session-proxy image.
fn proxy_container(deployment: &Value) -> &Value {
    let found: Vec<&Value> = containers(deployment)
        .iter()
        .filter(|c| {
            c["image"].as_str().is_some_and(|image| {
                image
                    .rsplit('/')
                    .next()
                    .unwrap_or(image)
                    .starts_with("session-proxy")
            })
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one container with a session-proxy image"
    );
    found[0]
}

/// The number of a container port given by number or by name.
fn container_port(container: &Value, port: &Value) -> u16 {
    let number = match port {
        Value::String(name) => {
            let ports = array(&container["ports"], "container ports");
            let found = ports
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .unwrap_or_else(|| {
                    panic!(
                        "container `{}` has no port named `{name}`",
                        container["name"]
                    )
                });
            number(&found["containerPort"], "containerPort")
        }
        other => number(other, "port"),
    };
    u16::try_from(number).expect("a port number fits in u16")
}

fn named_port(container: &Value, name: &str) -> u16 {
    container_port(container, &Value::String(name.into()))
}

// ---------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------

/// The Dockerfile's instructions as (upper-case keyword, arguments), comment lines
/// dropped and continuation lines joined the way Docker does.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile exists");
    let without_comments: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    without_comments
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            (keyword.to_ascii_uppercase(), args.trim().to_string())
        })
        .collect()
}

/// The instructions of the final stage: everything after the last `FROM`, that included.
fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile_instructions();
    let start = all
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("the Dockerfile has a FROM");
    all[start..].to_vec()
}

/// `ENV` of the final stage, in both the `K=V K2=V2` and the legacy `K V` form.
fn image_env() -> Vec<(String, String)> {
    let unquote = |s: &str| s.trim_matches('"').to_string();
    let mut env = Vec::new();
    for (_, args) in final_stage().iter().filter(|(k, _)| k == "ENV") {
        if args
            .split_whitespace()
            .next()
            .is_some_and(|first| first.contains('='))
        {
            for pair in args.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV K=V");
                env.push((k.to_string(), unquote(v)));
            }
        } else {
            let (k, v) = args.split_once(char::is_whitespace).expect("ENV K V");
            env.push((k.to_string(), unquote(v.trim())));
        }
    }
    env
}

// ---------------------------------------------------------------------------------------
// The proxy's configuration as the pod sees it
// ---------------------------------------------------------------------------------------

/// The `env` of a container, each value resolved: literal, or from a Secret or ConfigMap
/// of the manifests.
fn container_env(docs: &[Doc], container: &Value) -> Vec<(String, String)> {
    let Some(env) = container.get("env") else {
        return Vec::new();
    };
    array(env, "env")
        .iter()
        .map(|var| {
            let name = string(&var["name"], "env name").to_string();
            let value = if let Some(value) = var.get("value") {
                string(value, "env value").to_string()
            } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
                secret_value(
                    docs,
                    string(&r["name"], "secretKeyRef.name"),
                    string(&r["key"], "secretKeyRef.key"),
                )
            } else if let Some(r) = var["valueFrom"].get("configMapKeyRef") {
                let map = the_named(
                    docs,
                    "ConfigMap",
                    string(&r["name"], "configMapKeyRef.name"),
                );
                let key = string(&r["key"], "configMapKeyRef.key");
                string(&map["data"][key], "ConfigMap value").to_string()
            } else {
                panic!("env var {name} has neither a value nor a secretKeyRef/configMapKeyRef");
            };
            (name, value)
        })
        .collect()
}

fn secret_value(docs: &[Doc], name: &str, key: &str) -> String {
    let secret = the_named(docs, "Secret", name);
    if let Some(value) = secret["stringData"].get(key) {
        return string(value, "Secret stringData value").to_string();
    }
    if let Some(value) = secret["data"].get(key) {
        let bytes = STANDARD
            .decode(string(value, "Secret data value"))
            .unwrap_or_else(|e| panic!("Secret {name} key {key} is not base64: {e}"));
        return String::from_utf8(bytes).expect("Secret value is UTF-8");
    }
    panic!("Secret `{name}` has no key `{key}`");
}

/// Where `--config` points in the proxy container's args.
fn config_arg(container: &Value) -> PathBuf {
    let args: Vec<&str> = container
        .get("args")
        .map(|a| array(a, "args").iter().map(|v| string(v, "arg")).collect())
        .unwrap_or_default();
    args.iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config="))
                .map(PathBuf::from)
        })
        .expect("the proxy container is started with --config PATH")
}

/// The text of the file `--config` names, found through the volume mounted at its
/// directory and the ConfigMap that volume projects.
fn mounted_config_text(docs: &[Doc], deployment: &Value) -> String {
    let proxy = proxy_container(deployment);
    let path = config_arg(proxy);
    let dir = path.parent().expect("--config names a file in a directory");
    let file = path.file_name().unwrap().to_string_lossy().into_owned();

    let mount = array(&proxy["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))
        .unwrap_or_else(|| {
            panic!(
                "no volume is mounted at {} in the proxy container",
                dir.display()
            )
        });
    let volume_name = string(&mount["name"], "volumeMount name");
    let volume = array(&pod_spec(deployment)["volumes"], "volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("the pod has no volume `{volume_name}`"));
    let source = &volume["configMap"];
    let map_name = string(&source["name"], "volume configMap.name");
    let map = the_named(docs, "ConfigMap", map_name);

    // With `items`, only the listed keys appear, under their `path`.
    let key = match source.get("items") {
        Some(items) => {
            let item = array(items, "configMap items")
                .iter()
                .find(|i| i["path"].as_str() == Some(&file))
                .unwrap_or_else(|| panic!("the ConfigMap volume does not project {file}"));
            string(&item["key"], "item key").to_string()
        }
        None => file.clone(),
    };
    string(&map["data"][&key], "the mounted ConfigMap key").to_string()
}

static TEMP_FILES: AtomicUsize = AtomicUsize::new(0);

/// Loads `yaml` (when given) with the proxy's own loader and `env`.
fn load(yaml: Option<&str>, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let path = yaml.map(|text| {
        let n = TEMP_FILES.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("deploy-manifests-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, text).expect("temp file written");
        path
    });
    let flags = Overrides {
        config: path.clone(),
        ..Default::default()
    };
    let result = Config::load_from(&flags, env.iter().cloned());
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// The proxy container's environment: the image's `ENV`, then the Deployment's `env`
/// (which wins, as in Kubernetes).
fn effective_env(docs: &[Doc], deployment: &Value) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = image_env().into_iter().collect();
    env.extend(container_env(docs, proxy_container(deployment)));
    env.into_iter().collect()
}

/// The configuration the proxy container would start with.
fn pod_config(docs: &[Doc]) -> Config {
    let deployment = the(docs, "Deployment");
    let text = mounted_config_text(docs, &deployment);
    load(Some(&text), &effective_env(docs, &deployment)).unwrap_or_else(|e| {
        panic!("the ConfigMap's proxy.yaml with the pod's env does not load: {e}")
    })
}

// ---------------------------------------------------------------------------------------
// Kubernetes objects
// ---------------------------------------------------------------------------------------

#[test]
fn every_manifest_document_has_api_version_kind_and_name() {
    for doc in documents() {
        let v = &doc.value;
        assert!(v.is_object(), "{}: a document must be a mapping", doc.file);
        assert!(
            v["apiVersion"].as_str().is_some_and(|s| !s.is_empty()),
            "{}: missing apiVersion",
            doc.file
        );
        assert!(!doc.kind().is_empty(), "{}: missing kind", doc.file);
        let name = doc.name();
        assert!(
            !name.is_empty(),
            "{}: {} has no metadata.name",
            doc.file,
            doc.kind()
        );
        // RFC 1123 DNS label rules, which names of all four kinds satisfy.
        assert!(
            name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-'),
            "{}: `{name}` is not a valid Kubernetes object name",
            doc.file
        );
    }
}

#[test]
fn manifests_are_exactly_one_configmap_secret_deployment_and_service() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().map(Doc::kind).collect();
    let set: BTreeSet<&str> = kinds.iter().copied().collect();
    assert_eq!(
        set,
        BTreeSet::from(["ConfigMap", "Deployment", "Secret", "Service"]),
        "kinds present: {kinds:?}"
    );
    assert_eq!(kinds.len(), 4, "each kind once: {kinds:?}");
    for doc in &docs {
        let expected = match doc.kind() {
            "Deployment" => "apps/v1",
            _ => "v1",
        };
        assert_eq!(
            doc.value["apiVersion"],
            expected,
            "{}: apiVersion of {}",
            doc.file,
            doc.kind()
        );
    }
}

#[test]
fn secret_is_opaque_string_data() {
    let docs = documents();
    let secret = the(&docs, "Secret");
    assert_eq!(secret["type"], "Opaque");
    let data = secret["stringData"]
        .as_object()
        .expect("the Secret uses stringData");
    assert!(!data.is_empty());
    for (key, value) in data {
        assert!(
            value.is_string(),
            "stringData.{key} must be a string (quote it)"
        );
    }
}

#[test]
fn deployment_selector_matches_its_pod_template_labels() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("spec.selector.matchLabels");
    assert!(
        !selector.is_empty(),
        "an empty selector would select every pod"
    );
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "pod template label {key}");
    }
}

#[test]
fn service_selector_matches_the_pod_template_labels() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let service = the(&docs, "Service");
    let selector = service["spec"]["selector"]
        .as_object()
        .expect("Service spec.selector");
    assert!(!selector.is_empty(), "the Service needs a selector");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(
            &labels[key], value,
            "pod template label {key} selected by the Service"
        );
    }
}

#[test]
fn service_target_port_is_the_proxy_http_port() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let service = the(&docs, "Service");
    let proxy = proxy_container(&deployment);
    let ports = array(&service["spec"]["ports"], "Service ports");
    assert!(!ports.is_empty());
    for port in ports {
        let target = port.get("targetPort").unwrap_or(&port["port"]);
        assert_eq!(
            container_port(proxy, target),
            named_port(proxy, "http"),
            "Service port {port} must reach the proxy, never the app or the admin port"
        );
    }
    let app_ports: Vec<u16> = containers(&deployment)
        .iter()
        .filter(|c| c["name"] != proxy["name"])
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["containerPort"].as_u64())
        .map(|p| p as u16)
        .collect();
    assert!(
        !app_ports.contains(&named_port(proxy, "http")),
        "the app must not share the proxy's port"
    );
}

#[test]
fn probes_check_healthz_and_readyz_on_the_admin_port() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let proxy = proxy_container(&deployment);
    let admin = named_port(proxy, "admin");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &proxy[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(container_port(proxy, &get["port"]), admin, "{probe} port");
    }
}

#[test]
fn env_secret_refs_name_keys_of_the_secret() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    for container in containers(&deployment) {
        // Resolving panics on a missing Secret or key.
        for (name, value) in container_env(&docs, container) {
            assert!(!value.is_empty(), "env {name} resolves to an empty value");
        }
    }
}

#[test]
fn config_volume_projects_the_configmap_where_the_config_arg_points() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let proxy = proxy_container(&deployment);
    assert_eq!(
        config_arg(proxy),
        Path::new("/etc/session-proxy/proxy.yaml")
    );
    let text = mounted_config_text(&docs, &deployment);
    assert!(
        text.contains("upstream"),
        "the mounted file is the proxy configuration"
    );
}

#[test]
fn proxy_container_runs_locked_down() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let proxy = proxy_container(&deployment);
    let pod = &pod_spec(&deployment)["securityContext"];
    let sc = &proxy["securityContext"];
    assert!(
        sc["runAsNonRoot"] == true || pod["runAsNonRoot"] == true,
        "runAsNonRoot on the container or the pod"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    if let Some(uid) = sc["runAsUser"].as_u64() {
        assert_ne!(uid, 0, "runAsUser must not be root");
    }
    assert!(
        proxy["resources"]["requests"].is_object(),
        "resource requests"
    );
    assert!(
        proxy["resources"]["limits"]["memory"].is_string(),
        "a memory limit"
    );
}

// ---------------------------------------------------------------------------------------
// The embedded proxy.yaml, loaded with the crate's own loader
// ---------------------------------------------------------------------------------------

#[test]
fn configmap_proxy_yaml_loads_with_the_deployment_env() {
    let docs = documents();
    let config = pod_config(&docs);
    assert_eq!(config.store.kind, StoreType::Redis);
    assert_eq!(
        config.upstream, "http://127.0.0.1:3000",
        "the app container in the same pod"
    );
    assert!(
        config.session.secure,
        "cookies are Secure behind the HTTPS ingress"
    );
    assert!(config.session.secret.is_some(), "cookies are signed");
    let exclusions = Exclusions::new(&config.session.exclude).expect("valid exclusion globs");
    for path in ["/static/app.css", "/static/img/logo.png", "/healthz"] {
        assert!(exclusions.matches(path), "{path} is excluded from sessions");
    }
    for path in ["/", "/account", "/login"] {
        assert!(!exclusions.matches(path), "{path} has sessions");
    }
}

#[test]
fn deployment_env_vars_are_real_config_keys() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let env = container_env(&docs, proxy_container(&deployment));
    assert!(!env.is_empty());
    let loaded = serde_json::to_value(pod_config(&docs)).expect("config serialises");
    for (name, value) in &env {
        let key = name
            .strip_prefix("SESSION_PROXY_")
            .unwrap_or_else(|| panic!("{name} is not a SESSION_PROXY_ variable"))
            .to_ascii_lowercase();
        // The loaded configuration holds the variable's value under its key path, so
        // the name is a real key (an unknown one would not have loaded at all).
        let found = key
            .split("__")
            .try_fold(&loaded, |node, part| node.get(part))
            .unwrap_or_else(|| panic!("{name}: no config key `{}`", key.replace("__", ".")));
        match found {
            Value::String(s) => assert_eq!(s, value, "{name} sets `{}`", key.replace("__", ".")),
            other => assert_eq!(other.to_string(), *value, "{name}"),
        }
    }
}

#[test]
fn secrets_come_from_the_secret_not_the_configmap() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let text = mounted_config_text(&docs, &deployment);
    assert!(
        load(Some(&text), &[]).is_err(),
        "without the Secret's Redis URL the ConfigMap alone must not load"
    );
    let tree: Value = serde_saphyr::from_str(&text).expect("proxy.yaml is YAML");
    for (section, key) in [
        ("store", "url"),
        ("session", "secret"),
        ("session", "secret_fallbacks"),
    ] {
        assert!(
            tree[section].get(key).is_none(),
            "`{section}.{key}` belongs in the Secret, not the ConfigMap"
        );
    }
    assert!(
        tree.get("admin_token").is_none(),
        "admin_token belongs in the Secret"
    );
}

#[test]
fn config_listen_port_is_the_http_port_and_admin_listen_the_probe_port() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let proxy = proxy_container(&deployment);
    let config = pod_config(&docs);

    assert_eq!(
        config.listen.port(),
        named_port(proxy, "http"),
        "listen ↔ containerPort http"
    );
    assert!(
        config.listen.ip().is_unspecified(),
        "listen must accept connections from outside the pod"
    );

    let admin = config
        .admin_listen
        .expect("admin_listen is on, the probes need it");
    let probe_port = container_port(proxy, &proxy["livenessProbe"]["httpGet"]["port"]);
    assert_eq!(admin.port(), probe_port, "admin_listen ↔ probe port");
    assert!(
        admin.ip().is_unspecified(),
        "the kubelet probes the pod IP, not localhost"
    );
}

#[test]
fn image_env_does_not_override_the_configmap_listen_addresses() {
    // The image's ENV sets listen/admin_listen, and environment beats the config file:
    // the file's addresses must agree with it or they would silently not apply.
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let text = mounted_config_text(&docs, &deployment);
    let pod_env = container_env(&docs, proxy_container(&deployment));
    let without_image_env = load(Some(&text), &pod_env).expect("loads with the pod env alone");
    let with_image_env = pod_config(&docs);
    assert_eq!(without_image_env.listen, with_image_env.listen);
    assert_eq!(without_image_env.admin_listen, with_image_env.admin_listen);
}

#[test]
fn termination_grace_period_exceeds_drain_delay_plus_shutdown_timeout() {
    let docs = documents();
    let deployment = the(&docs, "Deployment");
    let config = pod_config(&docs);
    let grace = number(
        &pod_spec(&deployment)["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    ) as f64;
    let needed = config.shutdown.drain_delay + config.shutdown.timeout;
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace} must exceed {needed}"
    );

    // A preStop sleep counts against the same grace period.
    for container in containers(&deployment) {
        if let Some(seconds) = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64() {
            assert!(
                (seconds as f64) < grace,
                "container {}: preStop sleep {seconds}s leaves no time within the grace period",
                container["name"]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------

#[test]
fn dockerfile_final_stage_runs_as_non_root_and_exposes_listen_and_admin_ports() {
    let stage = final_stage();
    let user = stage
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "USER {user} must not be root"
    );

    let exposed: BTreeSet<u16> = stage
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|p| {
            p.split('/')
                .next()
                .unwrap()
                .parse()
                .expect("EXPOSE takes port numbers")
        })
        .collect();
    let config = pod_config(&documents());
    assert!(
        exposed.contains(&config.listen.port()),
        "EXPOSE the listen port: {exposed:?}"
    );
    let admin = config.admin_listen.expect("admin_listen").port();
    assert!(
        exposed.contains(&admin),
        "EXPOSE the admin port: {exposed:?}"
    );

    let entrypoint = stage
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, v)| v.clone())
        .expect("the final stage has an ENTRYPOINT");
    assert_eq!(entrypoint, r#"["/usr/local/bin/session-proxy"]"#);
}

#[test]
fn dockerfile_env_listens_on_all_interfaces_at_the_exposed_ports() {
    let env = image_env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"SESSION_PROXY_LISTEN"), "{names:?}");
    assert!(names.contains(&"SESSION_PROXY_ADMIN_LISTEN"), "{names:?}");
    // Without any file: what `docker run session-proxy:latest --upstream …` starts with.
    let config = load(None, &env).expect("the image's ENV is a valid configuration");
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(
        config.admin_listen.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:9901")
    );
}

#[test]
fn dockerfile_builds_a_locked_release_binary_and_copies_only_it() {
    let all = dockerfile_instructions();
    let froms: Vec<&String> = all
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert!(froms.len() >= 2, "multi-stage build: {froms:?}");
    assert!(
        froms[0].starts_with("rust:"),
        "build stage on the official Rust image: {}",
        froms[0]
    );
    let runs: String = all
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(runs.contains("cargo build --release --locked"), "{runs}");

    let copies: Vec<String> = final_stage()
        .into_iter()
        .filter(|(k, _)| k == "COPY" || k == "ADD")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the final stage copies only the binary: {copies:?}"
    );
    assert!(copies[0].starts_with("--from="), "{copies:?}");
    assert!(
        copies[0].ends_with("/usr/local/bin/session-proxy"),
        "{copies:?}"
    );
}

#[test]
fn dockerignore_keeps_build_artefacts_and_git_out_of_the_context() {
    let text =
        std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore exists");
    let patterns: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for needed in ["target", ".git"] {
        assert!(patterns.contains(needed), ".dockerignore lacks {needed}/");
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(
            !patterns.contains(needed),
            ".dockerignore must not exclude {needed}"
        );
    }
}
