//! The parts of a pod the rules read, borrowed from an AdmissionReview body or from a
//! k8s-openapi [`Pod`].
//!
//! Reading a review's object as a whole `Pod` allocated every string of it (managed fields,
//! volumes, environment) only for the rules to look at a handful. The view keeps the containers'
//! names, images and pull policies, the labels (the policy's object selector may test any) and
//! the annotations the rules write; everything else is skipped. What it keeps has the types a `Pod` gives it, and every level it
//! passes through must be a JSON object (or array) as in a `Pod`, so that a patch path it vouches
//! for exists in the object as sent.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use kache_api::pod_marks::{ContainerKind, ORIGINAL_IMAGE_PREFIX};

/// A pod as the rules read it.
#[derive(Debug, Default)]
pub(crate) struct PodView<'a> {
    /// `None` when the object has no `metadata` object (nothing can be added under it).
    pub metadata: Option<Meta<'a>>,
    pub containers: Vec<ContainerView<'a>>,
    pub init_containers: Vec<ContainerView<'a>>,
    pub ephemeral_containers: Vec<ContainerView<'a>>,
    /// `spec.imagePullSecrets`: `None` when the spec has none (or the form has no spec).
    pub pull_secrets: Option<Vec<SecretRefView<'a>>>,
}

/// One of `spec.imagePullSecrets`.
#[derive(Debug, Deserialize)]
pub(crate) struct SecretRefView<'a> {
    #[serde(default, borrow)]
    pub name: Option<Text<'a>>,
}

/// What the rules read of the metadata. A map is `None` when the object has none (or `null`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Meta<'a> {
    #[serde(default, borrow)]
    pub labels: Option<Labels<'a>>,
    #[serde(default, borrow)]
    pub annotations: Option<Annotations<'a>>,
}

/// One container of any kind.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerView<'a> {
    #[serde(default, borrow)]
    pub name: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub image: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub image_pull_policy: Option<Text<'a>>,
}

impl<'a> PodView<'a> {
    /// The view of a k8s-openapi `Pod`, borrowing its strings.
    pub fn of(pod: &'a Pod) -> Self {
        let m = &pod.metadata;
        let labels = m.labels.as_ref().map(|l| {
            Labels(Entries(
                l.iter()
                    .map(|(k, v)| (Text::from(k), Text::from(v)))
                    .collect(),
            ))
        });
        let annotations = m.annotations.as_ref().map(|a| {
            Annotations(Entries(
                a.iter()
                    .filter(|(k, _)| k.starts_with(ORIGINAL_IMAGE_PREFIX))
                    .map(|(k, v)| (Text::from(k), Text::from(v)))
                    .collect(),
            ))
        });
        let spec = pod.spec.as_ref();
        let view =
            |name: &'a String, image: &'a Option<String>, pull: &'a Option<String>| ContainerView {
                name: Some(Text::from(name)),
                image: image.as_ref().map(Text::from),
                image_pull_policy: pull.as_ref().map(Text::from),
            };
        PodView {
            metadata: Some(Meta {
                labels,
                annotations,
            }),
            containers: spec
                .into_iter()
                .flat_map(|s| &s.containers)
                .map(|c| view(&c.name, &c.image, &c.image_pull_policy))
                .collect(),
            init_containers: spec
                .and_then(|s| s.init_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| view(&c.name, &c.image, &c.image_pull_policy))
                .collect(),
            ephemeral_containers: spec
                .and_then(|s| s.ephemeral_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| view(&c.name, &c.image, &c.image_pull_policy))
                .collect(),
            pull_secrets: spec.and_then(|s| s.image_pull_secrets.as_ref()).map(|l| {
                l.iter()
                    .map(|r| SecretRefView {
                        name: Some(Text::from(&r.name)),
                    })
                    .collect()
            }),
        }
    }

    /// The containers of one kind, in spec order.
    pub fn list(&self, kind: ContainerKind) -> &[ContainerView<'a>] {
        match kind {
            ContainerKind::Container => &self.containers,
            ContainerKind::Init => &self.init_containers,
            ContainerKind::Ephemeral => &self.ephemeral_containers,
        }
    }

    /// The value of a label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels()?.0.get(key)
    }

    /// The value of an annotation the rules write (under [`ORIGINAL_IMAGE_PREFIX`]).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations()?.0.get(key)
    }

    /// The labels, when the object has a map of them.
    pub fn labels(&self) -> Option<&Labels<'a>> {
        self.metadata.as_ref()?.labels.as_ref()
    }

    /// The annotations, when the object has a map of them.
    pub fn annotations(&self) -> Option<&Annotations<'a>> {
        self.metadata.as_ref()?.annotations.as_ref()
    }
}

fn unwrap<T>(list: Option<Vec<Obj<T>>>) -> Vec<T> {
    // A newtype of the same layout: collected in place.
    list.unwrap_or_default()
        .into_iter()
        .map(|Obj(c)| c)
        .collect()
}

/// What a review's object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// A core/v1 Pod: creates, and updates of `pods/ephemeralcontainers` from Kubernetes 1.22.
    Pod,
    /// A core/v1 EphemeralContainers (`metadata` and `ephemeralContainers`): what an update of
    /// `pods/ephemeralcontainers` carries on Kubernetes 1.16–1.21.
    EphemeralContainers,
}

/// A review's object, read as the rules read the form the request names.
pub(crate) trait Object<'a> {
    fn read(self, form: Form) -> Result<PodView<'a>, serde_json::Error>;
}

/// The object still as it is in the body.
impl<'a> Object<'a> for &'a RawValue {
    fn read(self, form: Form) -> Result<PodView<'a>, serde_json::Error> {
        match form {
            Form::Pod => serde_json::from_str::<Obj<PodFields<'a>>>(self.get())?
                .0
                .pod(),
            Form::EphemeralContainers => {
                let Obj(o) =
                    serde_json::from_str::<Obj<EphemeralContainersFields<'a>>>(self.get())?;
                Ok(o.ephemeral_containers())
            }
        }
    }
}

/// The object read as either form, before the request says which: its fields of both forms read
/// as each form reads them, so that either reads as it would have on its own.
pub(crate) type EitherForm<'a> = Obj<Fields<'a, Text<'a>, Obj<Spec<'a>>, Containers<'a>>>;

impl<'a> Object<'a> for EitherForm<'a> {
    fn read(self, form: Form) -> Result<PodView<'a>, serde_json::Error> {
        match form {
            Form::Pod => self.0.pod(),
            Form::EphemeralContainers => Ok(self.0.ephemeral_containers()),
        }
    }
}

/// A Pod, as the rules read it. Its `apiVersion` and `kind`, when present, must say so.
type PodFields<'a> = Fields<'a, Text<'a>, Obj<Spec<'a>>, IgnoredAny>;

/// An EphemeralContainers, as the rules read it: the pod's metadata and ephemeral containers.
type EphemeralContainersFields<'a> = Fields<'a, IgnoredAny, IgnoredAny, Containers<'a>>;

type Containers<'a> = Vec<Obj<ContainerView<'a>>>;

/// The fields of an object either form reads; each form reads the other's as `IgnoredAny`. The
/// Pod form reads `apiVersion` and `kind` as `T` and `spec` as `S`, the EphemeralContainers form
/// `ephemeralContainers` as `E`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(bound(deserialize = "T: Deserialize<'de>, S: Deserialize<'de>, E: Deserialize<'de>"))]
pub(crate) struct Fields<'a, T, S, E> {
    /// A Pod holds these as plain strings: present means a string, never `null`.
    #[serde(default, deserialize_with = "some")]
    api_version: Option<T>,
    #[serde(default, deserialize_with = "some")]
    kind: Option<T>,
    #[serde(default, borrow)]
    metadata: Option<Obj<Meta<'a>>>,
    #[serde(default)]
    spec: Option<S>,
    #[serde(default)]
    ephemeral_containers: Option<E>,
}

impl<'a, E> Fields<'a, Text<'a>, Obj<Spec<'a>>, E> {
    fn pod(self) -> Result<PodView<'a>, serde_json::Error> {
        for (field, want) in [(&self.api_version, "v1"), (&self.kind, "Pod")] {
            if let Some(got) = field.as_ref().filter(|v| v.as_str() != want) {
                return Err(de::Error::invalid_value(
                    de::Unexpected::Str(got.as_str()),
                    &want,
                ));
            }
        }
        let spec = self.spec.map(|Obj(s)| s);
        let (containers, init_containers, ephemeral_containers, pull_secrets) = match spec {
            Some(s) => (
                unwrap(s.containers),
                unwrap(s.init_containers),
                unwrap(s.ephemeral_containers),
                s.image_pull_secrets
                    .map(|l| l.into_iter().map(|Obj(r)| r).collect()),
            ),
            None => Default::default(),
        };
        Ok(PodView {
            metadata: self.metadata.map(|Obj(m)| m),
            containers,
            init_containers,
            ephemeral_containers,
            pull_secrets,
        })
    }
}

impl<'a, T, S> Fields<'a, T, S, Containers<'a>> {
    /// A pod with the object's ephemeral containers and no other container.
    fn ephemeral_containers(self) -> PodView<'a> {
        PodView {
            // Patch operations under the metadata are dropped for this form: its absence only
            // hides the opt-out label, as an empty one would.
            metadata: self.metadata.map(|Obj(m)| m),
            ephemeral_containers: unwrap(self.ephemeral_containers),
            ..PodView::default()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Spec<'a> {
    #[serde(default, borrow)]
    containers: Option<Containers<'a>>,
    #[serde(default, borrow)]
    init_containers: Option<Containers<'a>>,
    #[serde(default, borrow)]
    ephemeral_containers: Option<Containers<'a>>,
    #[serde(default, borrow)]
    image_pull_secrets: Option<Vec<Obj<SecretRefView<'a>>>>,
}

fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A string of the body: borrowed, unless it holds escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Text<'a>(Cow<'a, str>);

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'a> From<&'a String> for Text<'a> {
    fn from(s: &'a String) -> Self {
        Text(Cow::Borrowed(s))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string that is checked, not kept (a map value the rules do not read).
struct AnyText;

impl<'de> Deserialize<'de> for AnyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AnyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(AnyText)
            }
        }
        d.deserialize_str(V)
    }
}

/// `T` read from a JSON object only. Derived structs also read arrays (field by field), which a
/// `Pod` never accepts and a patch path could not go through.
#[derive(Debug)]
pub(crate) struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Obj)
    }
}

/// The entries of a string map that the rules read. Every value must be a string, as in a
/// `Pod`; a repeated key keeps its last value, as a map does.
#[derive(Debug, Default)]
pub(crate) struct Entries<'a>(Vec<(Text<'a>, Text<'a>)>);

impl Entries<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_str())
    }

    fn read<'de, A: MapAccess<'de>>(
        mut map: A,
        keep: fn(&str) -> bool,
    ) -> Result<Entries<'de>, A::Error> {
        let mut out: Vec<(Text<'de>, Text<'de>)> = Vec::new();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if !keep(key.as_str()) {
                map.next_value::<AnyText>()?;
                continue;
            }
            let value = map.next_value::<Text<'de>>()?;
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => out.push((key, value)),
            }
        }
        Ok(Entries(out))
    }
}

/// The labels, every one: the opt-out and managed labels, and whatever the object selector
/// tests.
#[derive(Debug, Default)]
pub(crate) struct Labels<'a>(Entries<'a>);

/// The annotations under [`ORIGINAL_IMAGE_PREFIX`].
#[derive(Debug, Default)]
pub(crate) struct Annotations<'a>(Entries<'a>);

struct EntriesVisitor(fn(&str) -> bool);

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Entries::read(map, self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Labels<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor(|_| true)).map(Labels)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Annotations<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor(|k| k.starts_with(ORIGINAL_IMAGE_PREFIX)))
            .map(Annotations)
    }
}
