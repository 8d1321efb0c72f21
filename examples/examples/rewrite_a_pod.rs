//! What the admission webhook does to a pod, without a cluster: the rewrite rules take a Pod and
//! a policy and give a JSON patch; applied, every image points at the node proxy, and the
//! controller's reader gets the images as they were written back from the pod's marks.
//!
//!     cargo run -p kache-examples --example rewrite_a_pod

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kache_api::pod_marks::original_images;
use kache_webhook::{Pattern, Policy, Scope, rewrite};

fn main() {
    let container = |name: &str, image: &str| Container {
        name: name.into(),
        image: Some(image.into()),
        ..Container::default()
    };
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![
                container("web", "nginx:1.27"),
                container("sidecar", "ghcr.io/example/agent:2"),
                container("private", "registry.internal/team/app:7"),
            ],
            init_containers: Some(vec![container("migrate", "registry:5000/tools/migrate:3")]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    // What `kache webhook --ignore-registry '*.internal'` runs with.
    let policy = Policy {
        ignore_registries: vec![Pattern::registry("*.internal").expect("a valid glob")],
        ..Policy::default()
    };

    let decided = rewrite(&pod, &policy, Scope::Create);
    println!("rewritten: {}", decided.rewritten);
    for s in &decided.skipped {
        println!("left alone: {} {:?} ({:?})", s.kind, s.container, s.reason);
    }
    println!(
        "patch:\n{}",
        serde_json::to_string_pretty(&decided.patch).expect("a patch serializes")
    );

    let mut doc = serde_json::to_value(&pod).expect("a pod serializes");
    json_patch::patch(&mut doc, &decided.patch)
        .expect("the patch applies to the pod it was made for");
    let patched: Pod = serde_json::from_value(doc).expect("still a pod");
    let spec = patched.spec.as_ref().expect("a spec");
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        println!("{:>8}: {}", c.name, c.image.as_deref().unwrap_or(""));
    }

    // The controller reads the originals back, from the annotations the webhook added.
    for (kind, name, image) in original_images(&patched) {
        println!("{kind} {name} was {image}");
    }
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("localhost:7439/docker.io/library/nginx:1.27")
    );
}
