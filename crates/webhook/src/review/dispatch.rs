//! A request to the rules: the kinds, operations and subresources they take, the patch made to fit.

use json_patch::jsonptr::Pointer;
use json_patch::jsonptr::index::Index;
use json_patch::{PatchOperation, ReplaceOperation};
use kube::core::admission::Operation;

use super::Unhandled;
use super::envelope::Request;
use crate::rules::{self, ContainerKind, Policy};
use crate::view::{Form, Object, PodView, Text};

/// The rules' verdict and the patch to send (checked against the object as sent), or why the
/// rules were not applied.
pub(super) fn rewrite_request<'a, O: Object<'a>>(
    request: &mut Request<'a, O>,
    policy: &Policy,
) -> Result<(rules::Rewrite, Option<json_patch::Patch>), (Unhandled, String)> {
    let kind = &request.kind;
    let form = match (
        kind.group.as_str(),
        kind.version.as_str(),
        kind.kind.as_str(),
    ) {
        ("", "v1", "Pod") => Form::Pod,
        ("", "v1", "EphemeralContainers") => Form::EphemeralContainers,
        (group, version, kind) => {
            return Err((
                Unhandled::NotPod,
                format!(
                    "object is {group}/{version} {kind}, neither a Pod nor an EphemeralContainers"
                ),
            ));
        }
    };
    let sub_resource = request.sub_resource.as_ref().map(Text::as_str);
    let ephemeral_update =
        request.operation == Operation::Update && sub_resource == Some("ephemeralcontainers");
    let create =
        form == Form::Pod && request.operation == Operation::Create && sub_resource.is_none();
    if !create && !ephemeral_update {
        return Err((
            Unhandled::Operation,
            format!(
                "{:?} of pods{} ({}) is not rewritten",
                request.operation,
                sub_resource.map(|s| format!("/{s}")).unwrap_or_default(),
                kind.kind.as_str()
            ),
        ));
    }
    let object = request
        .object
        .take()
        .ok_or_else(|| (Unhandled::BadObject, "no object".to_owned()))?;
    let pod = read(object, form, "object")?;
    let old = if ephemeral_update {
        let old = request
            .old_object
            .take()
            .ok_or_else(|| (Unhandled::BadObject, "no oldObject".to_owned()))?;
        Some(read(old, form, "oldObject")?)
    } else {
        None
    };
    let namespace = request.namespace.as_deref();
    let mut rewrite = rules::rewrite_view(&pod, namespace, policy, old.as_ref());
    let patch = std::mem::take(&mut rewrite.patch);
    let patch = match form {
        Form::Pod => patch,
        Form::EphemeralContainers => onto_ephemeral_containers(patch)?,
    };
    if patch.0.is_empty() {
        return Ok((rewrite, None));
    }
    if let Some(op) = patch.0.iter().find(|op| !applies(op, &pod, form)) {
        return Err((
            Unhandled::BadPatch,
            format!("the patch does not apply: no target in the object for {op:?}"),
        ));
    }
    Ok((rewrite, Some(patch)))
}

/// The object as the rules read it. An EphemeralContainers object reads as a pod with its
/// metadata and its ephemeral containers (and no other container), so that the rules, their skip
/// reasons and warnings are the same for both forms.
///
/// The API server gives an EphemeralContainers only the pod's identity for metadata, and clients
/// send back what they read, so the pod's opt-out label is seen only when a client adds it.
fn read<'a>(
    object: impl Object<'a>,
    form: Form,
    field: &str,
) -> Result<PodView<'a>, (Unhandled, String)> {
    object.read(form).map_err(|e| {
        let what = match form {
            Form::Pod => "a Pod",
            Form::EphemeralContainers => "an EphemeralContainers",
        };
        (Unhandled::BadObject, format!("{field} is not {what}: {e}"))
    })
}

/// Whether `op` finds its target in the object as sent, read as `pod`: a patch that does not
/// apply would make the API server fail the request. A bug guard, in place of applying the patch
/// to a copy of the object: the rules only replace the image of a container that has one and add
/// labels and annotations, so nothing else is accepted. The view reads every level of these paths
/// as a JSON object or array, as they must be for the patch to apply.
fn applies(op: &PatchOperation, pod: &PodView<'_>, form: Form) -> bool {
    let mut path = op.path().tokens();
    let mut next = || path.next();
    match op {
        PatchOperation::Replace(_) => {
            if form == Form::Pod && next().is_none_or(|t| t.decoded() != "spec") {
                return false;
            }
            let (Some(list), Some(index), Some(field), None) = (next(), next(), next(), next())
            else {
                return false;
            };
            let Some(kind) = ContainerKind::ALL
                .into_iter()
                .find(|k| list.decoded() == k.spec_field())
            else {
                return false;
            };
            field.decoded() == "image"
                && matches!(index.to_index(), Ok(Index::Num(i))
                    if pod.list(kind).get(i).is_some_and(|c| c.image.is_some()))
        }
        PatchOperation::Add(_) => {
            let (Some(top), Some(map), key, None) = (next(), next(), next(), next()) else {
                return false;
            };
            // The pull-token secret, appended to a list the pod has.
            if top.decoded() == "spec" && map.decoded() == "imagePullSecrets" {
                return form == Form::Pod
                    && pod.pull_secrets.is_some()
                    && key.is_some_and(|k| k.decoded() == "-");
            }
            let Some(metadata) = &pod.metadata else {
                return false;
            };
            // A whole map may be added where there is none; a key only into a map.
            let exists = match &*map.decoded() {
                "labels" => metadata.labels.is_some(),
                "annotations" => metadata.annotations.is_some(),
                _ => return false,
            };
            top.decoded() == "metadata" && (key.is_none() || exists)
        }
        _ => false,
    }
}

/// The patch of an EphemeralContainers object's Pod view (see [`read`]), made to apply to the
/// object itself: `/spec/ephemeralContainers/<i>/image` becomes `/ephemeralContainers/<i>/image`.
///
/// The label and annotation operations are left out: the subresource stores nothing of the
/// object's metadata but its identity, and the controller reads the original image back from the
/// rewritten reference instead. Any other operation would be a bug, answered as such rather than
/// sent to the API server.
pub(super) fn onto_ephemeral_containers(
    patch: json_patch::Patch,
) -> Result<json_patch::Patch, (Unhandled, String)> {
    let spec = Pointer::from_static("/spec");
    let list = Pointer::from_static("/ephemeralContainers");
    let metadata = Pointer::from_static("/metadata");
    let mut ops = Vec::new();
    for op in patch.0 {
        let path = op.path();
        match (&op, path.strip_prefix(spec)) {
            (PatchOperation::Replace(r), Some(rest)) if rest.starts_with(list) => {
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: rest.to_buf(),
                    value: r.value.clone(),
                }));
            }
            _ if path.starts_with(metadata) => {}
            _ => {
                return Err((
                    Unhandled::BadPatch,
                    format!("no place in an EphemeralContainers for the operation {op:?}"),
                ));
            }
        }
    }
    Ok(json_patch::Patch(ops))
}
