//! CachedImage names: readable, deterministic, valid and unique.
//!
//! `docker.io/library/nginx:1.27` is named `docker.io-library-nginx-1.27`: separators become
//! `-`. That reads back unambiguously only when the host, the path components and the tag hold
//! no `-` of their own, the host has no port, and the reference is a tag; every other image
//! (`quay.io/jetstack/cert-manager-controller:v1.14.0`, a digest, an uppercase tag, a name
//! beyond 253 characters) gets `-` and the first 10 hex digits of the reference's SHA-256
//! appended, so two images never share a name and the same image always has the same one.

use sha2::{Digest, Sha256};

/// The longest name Kubernetes takes for a cluster-scoped object (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;
const HASH_LEN: usize = 10;

/// The CachedImage name of a normalised image reference.
pub fn cached_image_name(source_image: &str) -> String {
    let (mut name, exact) = readable(source_image);
    if exact && !looks_hashed(&name) && name.len() <= MAX_NAME_LEN {
        return name;
    }
    let hash = hex::encode(Sha256::digest(source_image.as_bytes()));
    name.truncate(MAX_NAME_LEN - HASH_LEN - 1);
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    if !name.is_empty() {
        name.push('-');
    }
    name.push_str(&hash[..HASH_LEN]);
    name
}

/// The sanitised reference, and whether it reads back as exactly this reference.
fn readable(source_image: &str) -> (String, bool) {
    let (host, rest) = source_image.split_once('/').unwrap_or(("", source_image));
    let (path, tag) = match rest.rsplit_once(':') {
        Some((p, t)) if !rest.contains('@') && !t.contains('/') => (p, Some(t)),
        _ => (rest, None),
    };
    let mut exact = !host.is_empty()
        && tag.is_some()
        && !host.contains([':', '-'])
        && !path.contains('-')
        && !tag.is_some_and(|t| t.contains('-'));

    let mut out = String::with_capacity(source_image.len());
    for c in source_image.chars() {
        let mapped = match c {
            'a'..='z' | '0'..='9' | '.' | '-' => c,
            '/' | ':' | '@' => '-',
            'A'..='Z' => {
                exact = false;
                c.to_ascii_lowercase()
            }
            _ => {
                exact = false;
                '-'
            }
        };
        // Each dot-separated label must start and end with a letter or digit.
        let prev = out.chars().last();
        if mapped == '.' && (prev.is_none() || prev == Some('-') || prev == Some('.')) {
            exact = false;
            continue;
        }
        if mapped == '-' && prev == Some('.') {
            exact = false;
            out.pop();
        }
        if mapped == '-' && prev.is_none() {
            exact = false;
            continue;
        }
        out.push(mapped);
    }
    while out.ends_with(['-', '.']) {
        exact = false;
        out.pop();
    }
    (out, exact)
}

/// Whether a name ends the way a hashed one does (`-` and 10 hex digits).
fn looks_hashed(name: &str) -> bool {
    name.rsplit_once('-').is_some_and(|(_, tail)| {
        tail.len() == HASH_LEN && tail.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_dns_subdomain(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    #[test]
    fn names_of_plain_references_read_as_the_reference() {
        let table = [
            (
                "docker.io/library/nginx:1.27",
                "docker.io-library-nginx-1.27",
            ),
            ("ghcr.io/fluxcd/flux:v2.3.0", "ghcr.io-fluxcd-flux-v2.3.0"),
            ("registry.k8s.io/pause:3.9", "registry.k8s.io-pause-3.9"),
        ];
        for (image, name) in table {
            assert_eq!(cached_image_name(image), name, "{image}");
        }
    }

    #[test]
    fn ambiguous_or_lossy_references_get_a_hash() {
        let table = [
            "quay.io/jetstack/cert-manager-controller:v1.14.0",
            "localhost:5000/team/app:1",
            "docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "docker.io/library/app:Release_1",
            "docker.io/library/app:1.",
            "docker.io/library/app:abcdef0123",
        ];
        for image in table {
            let name = cached_image_name(image);
            assert!(looks_hashed(&name), "{image} -> {name}");
            assert!(is_dns_subdomain(&name), "{image} -> {name}");
        }
        assert!(
            cached_image_name(table[0])
                .starts_with("quay.io-jetstack-cert-manager-controller-v1.14.0-")
        );
    }

    #[test]
    fn names_are_unique_where_sanitising_maps_two_references_together() {
        let images = [
            "docker.io/a/b:c-d",
            "docker.io/a/b-c:d",
            "docker.io/a/b/c:d",
            "docker.io/a/b:c_d",
            "docker.io/a/b:C-d",
            "docker.io/x/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "docker.io/x/nginx/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a-b.io/c:d",
            "a.io/b-c:d",
            "a:5000/b:c",
            "a/5000/b:c",
        ];
        let names: HashSet<_> = images.iter().map(|i| cached_image_name(i)).collect();
        assert_eq!(names.len(), images.len(), "{names:?}");
    }

    #[test]
    fn long_references_are_cut_to_a_valid_name() {
        let image = format!(
            "docker.io/{}/app:{}",
            "seg/".repeat(60).trim_end_matches('/'),
            "t".repeat(100)
        );
        let name = cached_image_name(&image);
        assert!(is_dns_subdomain(&name), "{name}");
        assert!(name.len() > MAX_NAME_LEN - 12, "cut, not emptied: {name}");
        assert_eq!(cached_image_name(&image), name, "deterministic");
    }

    #[test]
    fn every_name_is_a_valid_dns_subdomain() {
        let odd = [
            "x",
            "_/_:_",
            "docker.io/..a:..",
            "A/B:C",
            "h/p:-",
            ".-./:.",
            "docker.io/a:1__2",
        ];
        for image in odd {
            let name = cached_image_name(image);
            assert!(is_dns_subdomain(&name), "{image:?} -> {name:?}");
        }
    }
}
