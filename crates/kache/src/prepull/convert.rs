//! `kache prepull convert`: a kubernetes-image-puller configuration as a NodeImageSet.
//!
//! The puller reads a ConfigMap (or the same keys from its environment): `IMAGES`
//! (`name=image;name=image;`), `NODE_SELECTOR` (a JSON object), `IMAGE_PULL_SECRETS` (Secret
//! names in the puller's `NAMESPACE`), `TOLERATIONS` (a JSON list), `CACHING_INTERVAL_HOURS`,
//! and per-container resources. Everything with a NodeImageSet counterpart is carried over;
//! resources have none (a set's pods hold one small container, whatever the number of images)
//! and are named on stderr as left out.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use kache_api::{NodeImageSet, NodeImageSetSpec, SecretReference};
use serde_json::Value;

/// Keys the puller reads that a NodeImageSet does not need.
const LEFT_OUT: [&str; 6] = [
    "CACHING_MEMORY_REQUEST",
    "CACHING_MEMORY_LIMIT",
    "CACHING_CPU_REQUEST",
    "CACHING_CPU_LIMIT",
    "DAEMONSET_NAME",
    "AFFINITY",
];

/// The puller's keys, from a ConfigMap or one `IMAGES` string.
#[derive(Debug, Default)]
pub struct PullerConfig {
    /// The ConfigMap's name, if there was one.
    pub name: Option<String>,
    /// Its namespace (the puller's, where its pull secrets are).
    pub namespace: Option<String>,
    pub data: BTreeMap<String, String>,
}

impl PullerConfig {
    /// Reads a ConfigMap manifest (YAML or JSON).
    pub fn from_config_map(text: &str) -> anyhow::Result<Self> {
        let v: Value = serde_yaml::from_str(text).context("the input is not YAML or JSON")?;
        if v["kind"] != "ConfigMap" {
            bail!(
                "the input is a {}, not a ConfigMap (give an IMAGES string with --images)",
                v["kind"].as_str().unwrap_or("document without a kind")
            );
        }
        let mut data = BTreeMap::new();
        if let Some(map) = v["data"].as_object() {
            for (k, val) in map {
                let s = match val {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => bail!("data.{k}: expected a string, found {other}"),
                };
                data.insert(k.clone(), s);
            }
        }
        Ok(PullerConfig {
            name: v["metadata"]["name"].as_str().map(str::to_owned),
            namespace: v["metadata"]["namespace"].as_str().map(str::to_owned),
            data,
        })
    }

    /// Just an `IMAGES` string.
    pub fn from_images(images: &str) -> Self {
        PullerConfig {
            data: [("IMAGES".to_owned(), images.to_owned())].into(),
            ..PullerConfig::default()
        }
    }
}

/// The NodeImageSet named `name` (default: the ConfigMap's name) with the puller's images,
/// and the keys left out. `namespace` is where the pull secrets are when the ConfigMap does
/// not say (`NAMESPACE`, then its own namespace).
pub fn convert(
    config: &PullerConfig,
    name: Option<&str>,
    namespace: Option<&str>,
) -> anyhow::Result<(NodeImageSet, Vec<&'static str>)> {
    let images = parse_images(config.data.get("IMAGES").map(String::as_str).unwrap_or(""))?;
    let mut spec = serde_json::json!({ "images": images });
    if let Some(s) = non_empty(config, "NODE_SELECTOR") {
        let v: BTreeMap<String, String> = serde_json::from_str(s).with_context(|| {
            format!(
                "NODE_SELECTOR {s:?} is not a JSON object of strings (like {{\"pool\": \"ci\"}})"
            )
        })?;
        spec["nodeSelector"] = serde_json::json!(v);
    }
    if let Some(s) = non_empty(config, "TOLERATIONS") {
        let v: Vec<Value> = serde_json::from_str(s)
            .with_context(|| format!("TOLERATIONS {s:?} is not a JSON list of tolerations"))?;
        spec["tolerations"] = Value::Array(v);
    }
    if let Some(s) = non_empty(config, "IMAGE_PULL_SECRETS") {
        let ns = config
            .data
            .get("NAMESPACE")
            .filter(|n| !n.trim().is_empty())
            .map(|n| n.trim())
            .or(config.namespace.as_deref())
            .or(namespace)
            .context(
                "IMAGE_PULL_SECRETS names Secrets, but not their namespace: give --namespace",
            )?;
        let secrets: Vec<SecretReference> = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| SecretReference {
                namespace: ns.to_owned(),
                name: n.to_owned(),
            })
            .collect();
        spec["pullSecrets"] = serde_json::json!(secrets);
    }
    if let Some(s) = non_empty(config, "CACHING_INTERVAL_HOURS") {
        let hours: u64 = s.trim().parse().ok().filter(|h| *h > 0).with_context(|| {
            format!("CACHING_INTERVAL_HOURS {s:?} is not a whole number of hours")
        })?;
        spec["refresh"] = serde_json::json!(format!("{hours}h"));
    }
    let spec: NodeImageSetSpec = serde_json::from_value(spec).context("the converted spec")?;
    let name = name
        .map(str::to_owned)
        .or_else(|| config.name.clone())
        .unwrap_or_else(|| "image-puller".to_owned());
    if !kache_api::pod_marks::is_dns_subdomain(&name) {
        bail!("{name:?} is not a valid NodeImageSet name: give one with --name");
    }
    let left_out = LEFT_OUT
        .into_iter()
        .filter(|k| config.data.get(*k).is_some_and(|v| !v.trim().is_empty()))
        .collect();
    Ok((NodeImageSet::new(&name, spec), left_out))
}

fn non_empty<'a>(config: &'a PullerConfig, key: &str) -> Option<&'a str> {
    config
        .data
        .get(key)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty() && *s != "{}" && *s != "[]")
}

/// `name=image;name=image;` into the images, checked: every entry names a valid reference, no
/// name twice.
fn parse_images(s: &str) -> anyhow::Result<Vec<String>> {
    let mut names = BTreeMap::new();
    let mut images = Vec::new();
    for (i, entry) in s.split(';').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let n = i + 1;
        let Some((name, image)) = entry.split_once('=') else {
            bail!("IMAGES entry {n} {entry:?}: expected name=image");
        };
        let (name, image) = (name.trim(), image.trim());
        if name.is_empty() || image.is_empty() {
            bail!("IMAGES entry {n} {entry:?}: expected name=image");
        }
        if let Some(first) = names.insert(name.to_owned(), n) {
            bail!("IMAGES entry {n} {entry:?}: the name {name:?} is also entry {first}");
        }
        if let Err(e) = image.parse::<kache_oci::ImageReference>() {
            bail!("IMAGES entry {n} ({name}): {image:?} is not an image reference: {e}");
        }
        images.push(image.to_owned());
    }
    if images.is_empty() {
        bail!("IMAGES lists no image (expected name=image;name=image;...)");
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG_MAP: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: k8s-image-puller
  namespace: image-puller
data:
  IMAGES: "java11-maven=quay.io/eclipse/che-java11-maven:next;theia=quay.io/eclipse/che-theia:next;"
  DAEMONSET_NAME: kubernetes-image-puller
  CACHING_INTERVAL_HOURS: "1"
  CACHING_MEMORY_REQUEST: 10Mi
  CACHING_MEMORY_LIMIT: 20Mi
  NODE_SELECTOR: '{"type": "compute"}'
  IMAGE_PULL_SECRETS: "quay-creds, other"
  TOLERATIONS: '[{"key": "ci", "operator": "Exists", "effect": "NoSchedule"}]'
"#;

    #[test]
    fn a_config_map_becomes_a_node_image_set_with_what_has_a_counterpart() {
        let config = PullerConfig::from_config_map(CONFIG_MAP).unwrap();
        let (set, left_out) = convert(&config, None, None).unwrap();
        let v = serde_json::to_value(&set).unwrap();
        assert_eq!(v["apiVersion"], "kache.io/v1alpha1");
        assert_eq!(v["kind"], "NodeImageSet");
        assert_eq!(v["metadata"]["name"], "k8s-image-puller");
        assert_eq!(
            v["spec"]["images"],
            serde_json::json!([
                "quay.io/eclipse/che-java11-maven:next",
                "quay.io/eclipse/che-theia:next"
            ])
        );
        assert_eq!(
            v["spec"]["nodeSelector"],
            serde_json::json!({"type": "compute"})
        );
        assert_eq!(v["spec"]["tolerations"][0]["key"], "ci");
        assert_eq!(
            v["spec"]["pullSecrets"],
            serde_json::json!([
                {"namespace": "image-puller", "name": "quay-creds"},
                {"namespace": "image-puller", "name": "other"}
            ])
        );
        assert_eq!(v["spec"]["refresh"], "1h");
        assert_eq!(
            left_out,
            [
                "CACHING_MEMORY_REQUEST",
                "CACHING_MEMORY_LIMIT",
                "DAEMONSET_NAME"
            ]
        );
    }

    #[test]
    fn an_images_string_alone_is_enough() {
        let config = PullerConfig::from_images("a=redis:7; b=python:3.12");
        let (set, left_out) = convert(&config, Some("ci-images"), None).unwrap();
        assert_eq!(set.spec.images, ["redis:7", "python:3.12"]);
        assert_eq!(set.metadata.name.as_deref(), Some("ci-images"));
        assert!(left_out.is_empty());
    }

    #[test]
    fn bad_input_is_named_entry_by_entry() {
        let err = |images: &str| {
            convert(&PullerConfig::from_images(images), None, None)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("a=redis:7;python:3.12"),
            "IMAGES entry 2 \"python:3.12\": expected name=image"
        );
        assert!(
            err("a=redis:7;b=Not A Ref")
                .starts_with("IMAGES entry 2 (b): \"Not A Ref\" is not an image reference")
        );
        assert_eq!(
            err("a=redis:7;a=python:3"),
            "IMAGES entry 2 \"a=python:3\": the name \"a\" is also entry 1"
        );
        assert_eq!(err("a=;"), "IMAGES entry 1 \"a=\": expected name=image");
        assert!(err(";;").starts_with("IMAGES lists no image"));

        let mut config = PullerConfig::from_images("a=redis:7");
        config
            .data
            .insert("IMAGE_PULL_SECRETS".into(), "creds".into());
        let e = convert(&config, None, None).unwrap_err().to_string();
        assert!(e.contains("give --namespace"), "{e}");
        let (set, _) = convert(&config, None, Some("ci")).unwrap();
        assert_eq!(set.spec.pull_secrets[0].namespace, "ci");

        config
            .data
            .insert("NODE_SELECTOR".into(), "type=compute".into());
        let e = convert(&config, None, Some("ci")).unwrap_err().to_string();
        assert!(e.starts_with("NODE_SELECTOR \"type=compute\""), "{e}");
        config.data.remove("NODE_SELECTOR");
        config
            .data
            .insert("CACHING_INTERVAL_HOURS".into(), "1.5".into());
        let e = convert(&config, None, Some("ci")).unwrap_err().to_string();
        assert!(e.starts_with("CACHING_INTERVAL_HOURS \"1.5\""), "{e}");

        let e = PullerConfig::from_config_map("kind: Secret\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a Secret, not a ConfigMap"), "{e}");
        let e = convert(
            &PullerConfig::from_images("a=redis:7"),
            Some("Bad_Name"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a valid NodeImageSet name"), "{e}");
    }
}
