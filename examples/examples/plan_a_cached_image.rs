//! The controller's decisions, on Pods and Nodes as the API server would send them, without
//! one: which CachedImages a rewritten pod needs, which platforms to cache them for, and when an
//! image no pod uses any more expires.
//!
//!     cargo run -p kache-examples --example plan_a_cached_image

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Node, NodeStatus, NodeSystemInfo, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kache_api::{CachedImageSpec, cached_image_name};
use kache_controller::decide::{self, Expiry};
use kache_webhook::{Policy, Scope, rewrite};

fn node(arch: &str) -> Node {
    Node {
        status: Some(NodeStatus {
            node_info: Some(NodeSystemInfo {
                operating_system: "linux".into(),
                architecture: arch.into(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn main() {
    // A pod as the webhook leaves it: rewritten to the proxy, its originals in annotations.
    let written = Pod {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some("web-1".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "web".into(),
                image: Some("nginx:1.27".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let patch = rewrite(&written, &Policy::default(), Scope::Create).patch;
    let mut doc = serde_json::to_value(&written).expect("a pod serializes");
    json_patch::patch(&mut doc, &patch).expect("the patch applies");
    let pod: Pod = serde_json::from_value(doc).expect("still a pod");

    // One CachedImage per normalised image, named from it.
    for image in decide::pod_images(&pod) {
        println!("{} → CachedImage {}", image, cached_image_name(&image));
    }
    let image = "docker.io/library/nginx:1.27";
    println!("used by: {:?}", decide::users(image, [&pod]));

    // Cached for every platform the nodes run.
    let nodes = [node("amd64"), node("arm64"), node("amd64")];
    println!("platforms: {:?}", decide::platforms(&nodes));

    // Unused, it expires after the delay (30 days by default); retained, never.
    let now = Timestamp::now();
    let spec = CachedImageSpec {
        source_image: image.into(),
        ..CachedImageSpec::default()
    };
    let month = Duration::from_secs(30 * 86_400);
    match decide::expiry(&spec, 0, now, month) {
        Expiry::At(t) => println!("unused: expires at {t}"),
        other => println!("unused: {other:?}"),
    }
    assert!(matches!(decide::expiry(&spec, 1, now, month), Expiry::Keep));
    let retained = CachedImageSpec {
        retain: true,
        ..spec
    };
    assert!(matches!(
        decide::expiry(&retained, 0, now, month),
        Expiry::Keep
    ));
    println!("retained or in use: kept");
}
