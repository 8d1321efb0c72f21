//! A label selector, as a MutatingWebhookConfiguration's `objectSelector` holds it, evaluated the
//! way the API server evaluates it, so that the webhook and the controller select the same pods.
//!
//! It is written as the JSON of a `LabelSelector` (`{"matchExpressions": [...]}`), the form the
//! chart already holds, and matched against a lookup rather than a map: the webhook reads a pod's
//! labels where they lie in the AdmissionReview's body.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A label selector: every requirement must hold. The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One requirement on one label key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// Why a selector does not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("not the JSON of a label selector ({{\"matchExpressions\": [...]}}): {0}")]
    Json(String),
    #[error("matchExpressions[{index}]: {why}")]
    Expression { index: usize, why: String },
}

impl Selector {
    /// Reads the JSON of a `LabelSelector`; `""` is the empty selector.
    pub fn from_json(json: &str) -> Result<Self, SelectorError> {
        if json.trim().is_empty() {
            return Ok(Selector::default());
        }
        let s: LabelSelector =
            serde_json::from_str(json).map_err(|e| SelectorError::Json(e.to_string()))?;
        Self::from_label_selector(&s)
    }

    /// The selector a `LabelSelector` stands for, refusing what the API server refuses: an
    /// unknown operator, `In`/`NotIn` without values, `Exists`/`DoesNotExist` with some.
    pub fn from_label_selector(s: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in s.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: key.clone(),
                op: Op::In(BTreeSet::from([value.clone()])),
            });
        }
        for (index, e) in s.match_expressions.iter().flatten().enumerate() {
            let bad = |why: String| SelectorError::Expression { index, why };
            if e.key.is_empty() {
                return Err(bad("the key is empty".to_owned()));
            }
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(bad(format!("{} needs at least one value", e.operator)));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(bad(format!("{} takes no values", e.operator)));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(bad(format!(
                        "operator {other:?} is none of In, NotIn, Exists, DoesNotExist"
                    )));
                }
            };
            requirements.push(Requirement {
                key: e.key.clone(),
                op,
            });
        }
        Ok(Selector { requirements })
    }

    /// Whether the object whose labels `label` looks up is selected.
    pub fn matches<'l>(&self, label: impl Fn(&str) -> Option<&'l str>) -> bool {
        self.requirements
            .iter()
            .all(|r| match (&r.op, label(&r.key)) {
                (Op::In(set), Some(v)) => set.contains(v),
                (Op::In(_), None) => false,
                (Op::NotIn(set), Some(v)) => !set.contains(v),
                (Op::NotIn(_), None) => true,
                (Op::Exists, found) => found.is_some(),
                (Op::DoesNotExist, found) => found.is_none(),
            })
    }

    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// The selector in kubectl's notation (`team notin (infra),tier`), for logs.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let set = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
            match &r.op {
                Op::In(s) => write!(f, "{} in ({})", r.key, set(s))?,
                Op::NotIn(s) => write!(f, "{} notin ({})", r.key, set(s))?,
                Op::Exists => write!(f, "{}", r.key)?,
                Op::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selects(selector: &str, pairs: &[(&str, &str)]) -> bool {
        let l = labels(pairs);
        Selector::from_json(selector)
            .unwrap()
            .matches(|k| l.get(k).map(String::as_str))
    }

    #[test]
    fn requirements_hold_as_the_api_server_evaluates_them() {
        let not_in =
            r#"{"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra","ops"]}]}"#;
        let is_in = r#"{"matchExpressions":[{"key":"team","operator":"In","values":["web"]}]}"#;
        let exists = r#"{"matchExpressions":[{"key":"team","operator":"Exists"}]}"#;
        let absent = r#"{"matchExpressions":[{"key":"team","operator":"DoesNotExist"}]}"#;
        let both = r#"{"matchLabels":{"tier":"front"},"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra"]}]}"#;
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let table: &[Case<'_>] = &[
            ("", &[], true),
            ("{}", &[("team", "infra")], true),
            (not_in, &[], true),
            (not_in, &[("team", "infra")], false),
            (not_in, &[("team", "web")], true),
            (is_in, &[], false),
            (is_in, &[("team", "web")], true),
            (is_in, &[("team", "infra")], false),
            (exists, &[("team", "")], true),
            (exists, &[("other", "x")], false),
            (absent, &[], true),
            (absent, &[("team", "web")], false),
            (both, &[("tier", "front")], true),
            (both, &[("tier", "front"), ("team", "infra")], false),
            (both, &[("team", "web")], false),
        ];
        for (selector, pairs, want) in table {
            assert_eq!(selects(selector, pairs), *want, "{selector} on {pairs:?}");
        }
    }

    #[test]
    fn what_the_api_server_refuses_is_refused_with_the_reason() {
        for (json, says) in [
            ("[]", "not the JSON of a label selector"),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"Is"}]}"#,
                "\"Is\"",
            ),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#,
                "at least one value",
            ),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#,
                "takes no values",
            ),
            (
                r#"{"matchExpressions":[{"key":"","operator":"Exists"}]}"#,
                "key is empty",
            ),
        ] {
            let e = Selector::from_json(json).unwrap_err().to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
    }

    #[test]
    fn it_reads_back_in_kubectl_notation() {
        let s = Selector::from_json(
            r#"{"matchExpressions":[{"key":"team","operator":"NotIn","values":["ops","infra"]},{"key":"tier","operator":"Exists"},{"key":"x","operator":"DoesNotExist"}]}"#,
        )
        .unwrap();
        assert_eq!(s.to_string(), "team notin (infra,ops),tier,!x");
    }
}
