//! Image and registry patterns, from `--accept` and `--ignore-registry`: globs and regexes.

use kache_oci::ImageReference;
use regex::Regex;

/// A pattern from `--accept` or `--ignore-registry`.
///
/// `regex:<re>` is a regular expression searched (unanchored) in the normalised reference
/// (`docker.io/library/nginx:1.27`, with `@<digest>` when there is one), or in the registry host
/// for `--ignore-registry`. Anything else is a glob, matched whole: `*` is any run of characters
/// (`/` included), `?` one character. An image glob with a `/` matches the normalised name
/// (`docker.io/library/*`); one without matches the registry host (`*.example.com`), as registry
/// globs always do, with any port unless the glob names one.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
    target: Target,
    /// A host glob without `:` also matches the host with its port cut off.
    any_port: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Registry,
    Name,
    Reference,
}

/// A pattern that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("pattern {pattern:?}: {source}")]
pub struct PatternError {
    pattern: String,
    #[source]
    source: regex::Error,
}

impl Pattern {
    /// A pattern selecting images (`--accept`).
    pub fn image(pattern: &str) -> Result<Self, PatternError> {
        match pattern.strip_prefix("regex:") {
            Some(re) => Self::compile(pattern, re, Target::Reference),
            None if pattern.contains('/') => Self::glob(pattern, Target::Name),
            None => Self::glob(pattern, Target::Registry),
        }
    }

    /// A pattern selecting registry hosts (`--ignore-registry`): `quay.io`, `*.internal`.
    pub fn registry(pattern: &str) -> Result<Self, PatternError> {
        match pattern.strip_prefix("regex:") {
            Some(re) => Self::compile(pattern, re, Target::Registry),
            None => Self::glob(pattern, Target::Registry),
        }
    }

    /// The pattern as it was given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern selects `image`.
    pub fn matches(&self, image: &ImageReference) -> bool {
        match self.target {
            Target::Registry => {
                self.regex.is_match(&image.registry)
                    || (self.any_port
                        && image
                            .registry
                            .split_once(':')
                            .is_some_and(|(host, _)| self.regex.is_match(host)))
            }
            Target::Name => self
                .regex
                .is_match(&format!("{}/{}", image.registry, image.repository)),
            Target::Reference => self.regex.is_match(&image.to_string()),
        }
    }

    fn glob(pattern: &str, target: Target) -> Result<Self, PatternError> {
        // Names and hosts are lowercase once normalised; a glob written `Quay.io` still means it.
        let lower = pattern.to_ascii_lowercase();
        // Docker Hub's aliases normalise to docker.io, so a glob naming one must as well.
        let lower = match lower.as_str() {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
            _ => lower,
        };
        let mut re = String::with_capacity(lower.len() + 8);
        re.push('^');
        let mut literal = String::new();
        for c in lower.chars() {
            if matches!(c, '*' | '?') {
                re.push_str(&regex::escape(&literal));
                literal.clear();
                re.push_str(if c == '*' { ".*" } else { "." });
            } else {
                literal.push(c);
            }
        }
        re.push_str(&regex::escape(&literal));
        re.push('$');
        let mut p = Self::compile(pattern, &re, target)?;
        p.any_port = target == Target::Registry && !lower.contains(':');
        Ok(p)
    }

    fn compile(source: &str, re: &str, target: Target) -> Result<Self, PatternError> {
        let regex = Regex::new(re).map_err(|source| PatternError {
            pattern: re.to_owned(),
            source,
        })?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
            target,
            any_port: false,
        })
    }
}
