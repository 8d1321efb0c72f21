//! Any bytes as a `POST /mutate` body, through the function the server answers with: no panic;
//! an answer echoes the uid and allows the request; a patch applies to the object as sent, and
//! admitting the patched object again changes nothing.

#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kache_webhook::{Pattern, Policy, review};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let policies = [
        Policy::default(),
        Policy {
            skip_mutable: true,
            ignore_registries: vec![Pattern::registry("*.internal").unwrap()],
            accept: vec![
                Pattern::image("docker.io/library/*").unwrap(),
                Pattern::image("regex:^ghcr\\.io/").unwrap(),
            ],
            ..Policy::default()
        },
    ];
    for policy in &policies {
        let Ok(reviewed) = review(data, policy) else {
            continue;
        };
        let answer: Value = serde_json::from_slice(&reviewed.body).expect("the answer is JSON");
        let response = &answer["response"];
        assert_eq!(response["allowed"], true);
        assert_eq!(response["uid"].as_str(), Some(reviewed.uid.as_str()));
        let Some(patch) = response.get("patch") else {
            continue;
        };
        let bytes = STANDARD
            .decode(patch.as_str().expect("base64"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
        // The webhook skips what it does not read, where JSON a `Value` cannot hold (a number
        // beyond f64, a lone surrogate) may be: then there is no object to apply the patch to.
        let Ok(mut body) = serde_json::from_slice::<Value>(data) else {
            continue;
        };
        let object = body
            .pointer_mut("/request/object")
            .expect("a patched object");
        json_patch::patch(object, &patch).expect("the patch applies to the object as sent");
        let again = review(&serde_json::to_vec(&body).unwrap(), policy).expect("still a review");
        let answer: Value = serde_json::from_slice(&again.body).unwrap();
        assert!(
            answer["response"].get("patch").is_none(),
            "a second admission patched again: {answer}"
        );
    }
});
