{{/* Names: every object is <fullname>-<component>. */}}
{{- define "kache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "kache.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kache.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels of every object; `component` is set by the caller through a dict. */}}
{{- define "kache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kache
{{ include "kache.selectorLabels" . }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- with .values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kache.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An object's metadata.annotations, from the component's `annotations`. */}}
{{- define "kache.annotations" -}}
{{- with .values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "kache.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else -}}
{{ printf "%s:%s" .Values.image.repository $tag }}
{{- end -}}
{{- end }}

{{/* The in-cluster DNS names of the registry's Services. */}}
{{- define "kache.registryHost" -}}
{{ include "kache.fullname" . }}-registry.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}
{{- define "kache.registryInternalHost" -}}
{{ include "kache.fullname" . }}-registry-internal.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* Where the proxies read from. */}}
{{- define "kache.proxyRegistryURL" -}}
{{- .Values.proxy.registryURL | default (printf "http://%s:%d" (include "kache.registryHost" .) (int .Values.registry.port)) }}
{{- end }}

{{/* Where the controller writes: the internal listener, or the read one with the write token. */}}
{{- define "kache.controllerRegistryURL" -}}
{{- if .Values.controller.registryURL }}
{{- .Values.controller.registryURL }}
{{- else if eq .Values.registry.writeAccess "token" }}
{{- printf "http://%s:%d" (include "kache.registryHost" .) (int .Values.registry.port) }}
{{- else }}
{{- printf "http://%s:%d" (include "kache.registryInternalHost" .) (int .Values.registry.internalPort) }}
{{- end }}
{{- end }}

{{- define "kache.webhookTLSSecret" -}}
{{- if .Values.certManager.enabled }}
{{- include "kache.fullname" . }}-webhook-tls
{{- else }}
{{- .Values.webhook.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* The address a component listens on: every address in its own network namespace, the
node's own address on the node's network (never every interface of a node). */}}
{{- define "kache.listenHost" -}}
{{- if . }}$(POD_IP){{ else }}0.0.0.0{{ end }}
{{- end }}

{{- define "kache.podIPEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
{{- end }}

{{/* Pod-level security: non-root, RuntimeDefault seccomp. */}}
{{- define "kache.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security: read-only root, no capabilities, no escalation. */}}
{{- define "kache.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end }}

{{/* Scheduling and placement fields shared by every component's pod spec. */}}
{{- define "kache.scheduling" -}}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A pod template's metadata: selector labels, the component's pod labels, and the label that
keeps the webhook away from kache's own pods on every Kubernetes version. */}}
{{- define "kache.podMetadata" -}}
labels:
  {{- include "kache.selectorLabels" . | nindent 2 }}
  kache.io/image-caching-policy: ignore
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The flags every upstream client (registry, proxy) takes, from `upstream`. */}}
{{- define "kache.upstreamArgs" -}}
- --upstream-timeout={{ .Values.upstream.timeout }}
{{- range .Values.upstream.insecureRegistries }}
- --insecure-registry={{ . }}
{{- end }}
{{- if .Values.upstream.dockerConfigSecret }}
- --docker-config=/etc/kache/docker-config/.dockerconfigjson
{{- end }}
{{- if .Values.upstream.caBundle }}
- --ca-file=/etc/kache/upstream-ca/ca.crt
{{- end }}
{{- end }}

{{/* The namespaces left alone, as a JSON list: kube-system, the release's, and
webhook.ignoredNamespaces. */}}
{{- define "kache.ignoredNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.webhook.ignoredNamespaces | uniq | toJson }}
{{- end }}

{{/* The caching policy, the same flags for the webhook (what it rewrites) and the controller
(what it pre-caches): an exclusion leaves the pod and the cache alike untouched. */}}
{{- define "kache.policyArgs" -}}
{{- $w := .Values.webhook -}}
- --proxy-port={{ .Values.proxy.port }}
{{- range include "kache.ignoredNamespaces" . | fromJsonArray }}
- {{ printf "--ignore-namespace=%s" . | quote }}
{{- end }}
{{- with $w.objectSelector.matchExpressions }}
- {{ printf "--object-selector=%s" (dict "matchExpressions" . | toJson) | quote }}
{{- end }}
{{- range $w.ignoredRegistries }}
- {{ printf "--ignore-registry=%s" . | quote }}
{{- end }}
{{- range $w.acceptedImages }}
- {{ printf "--accept=%s" . | quote }}
{{- end }}
{{- if $w.skipMutableTags }}
- --skip-mutable
{{- end }}
{{- if .Values.privateImages.enabled }}
- --pull-secret={{ .Values.privateImages.secretName }}
{{- end }}
{{- end }}

{{- /* The Secret of the pull-token keys: the user's, or the one the chart makes. */ -}}
{{- define "kache.pullTokenKeysSecret" -}}
{{- .Values.privateImages.keySecret | default (printf "%s-pull-token-keys" (include "kache.fullname" .)) -}}
{{- end }}

{{- define "kache.upstreamMounts" -}}
{{- if .Values.upstream.dockerConfigSecret }}
- name: docker-config
  mountPath: /etc/kache/docker-config
  readOnly: true
{{- end }}
{{- if .Values.upstream.caBundle }}
- name: upstream-ca
  mountPath: /etc/kache/upstream-ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "kache.upstreamVolumes" -}}
{{- if .Values.upstream.dockerConfigSecret }}
- name: docker-config
  secret:
    secretName: {{ .Values.upstream.dockerConfigSecret }}
    items:
      - {key: .dockerconfigjson, path: .dockerconfigjson}
{{- end }}
{{- if .Values.upstream.caBundle }}
- name: upstream-ca
  configMap:
    name: {{ include "kache.fullname" . }}-upstream-ca
{{- end }}
{{- end }}

{{/* 90% of registry.emptyDirSizeLimit (a quantity the schema has checked), in bytes. */}}
{{- define "kache.emptyDirMaxSize" -}}
{{- $q := toString .Values.registry.emptyDirSizeLimit -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $units := dict "" 1.0 "K" 1e3 "Ki" 1024.0 "M" 1e6 "Mi" 1048576.0 "G" 1e9 "Gi" 1073741824.0 "T" 1e12 "Ti" 1099511627776.0 "P" 1e15 "Pi" 1125899906842624.0 "E" 1e18 "Ei" 1152921504606846976.0 -}}
{{- $unit := get $units (trimPrefix $number $q) -}}
{{- printf "%.0f" (floor (mulf (mulf (float64 $number) $unit) 0.9)) -}}
{{- end }}

{{/* policy/v1 where served (1.21+), policy/v1beta1 before (1.20). */}}
{{- define "kache.pdbApiVersion" -}}
{{- if .Capabilities.APIVersions.Has "policy/v1" -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end -}}
{{- end }}
