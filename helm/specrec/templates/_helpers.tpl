{{/*
Chart name, overridable with nameOverride.
Truncated to 63 characters because some Kubernetes name fields are limited to that (DNS-1123 labels).
*/}}
{{- define "specrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name: <release>-<chart>, or the release name alone when it already contains
the chart name. Truncated to 52 characters so that a component suffix ("-orchestrator", 13
characters) still fits in 63.
*/}}
{{- define "specrec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of one component's resources, e.g. "rel-specrec-triton".
Call with (dict "ctx" $ "component" "triton").
*/}}
{{- define "specrec.componentName" -}}
{{- printf "%s-%s" (include "specrec.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "specrec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component. These are immutable on Deployments and used by Services,
PodDisruptionBudgets and NetworkPolicies, so they hold nothing that changes between upgrades.
Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specrec.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Common labels of one component: selector labels plus chart, version and commonLabels.
Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.labels" -}}
helm.sh/chart: {{ include "specrec.chart" .ctx }}
{{ include "specrec.selectorLabels" . }}
{{- if .ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: {{ include "specrec.name" .ctx }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Image reference; an empty tag falls back to the chart's appVersion.
Call with (dict "ctx" $ "image" .Values.orchestrator.image).
*/}}
{{- define "specrec.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
Service account name of one component: the generated name when the chart creates it, else the
given name or "default". Call with (dict "ctx" $ "component" "draft" "sa" .Values.draft.serviceAccount).
*/}}
{{- define "specrec.serviceAccountName" -}}
{{- if .sa.create }}
{{- default (include "specrec.componentName" .) .sa.name }}
{{- else }}
{{- default "default" .sa.name }}
{{- end }}
{{- end }}

{{/*
Resources of one container with the accelerator added: nothing for "none", nvidia.com/gpu for
"gpu", nvidia.com/mig-<profile> for "mig". Extended resources cannot be overcommitted, so the
count goes into limits (Kubernetes copies it to requests).
Call with (dict "resources" .Values.draft.resources "accelerator" .Values.draft.accelerator).
*/}}
{{- define "specrec.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- $acc := .accelerator }}
{{- if ne $acc.kind "none" }}
{{- $limits := default dict $res.limits }}
{{- $resourceName := "nvidia.com/gpu" }}
{{- if eq $acc.kind "mig" }}
{{- $resourceName = printf "nvidia.com/mig-%s" $acc.migProfile }}
{{- end }}
{{- $_ := set $limits $resourceName ($acc.count | int) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
Tolerations of one pod: the GPU taint that GPU node pools usually carry (only when a GPU or MIG
slice is requested), then the user's tolerations.
Call with (dict "tolerations" .Values.draft.tolerations "accelerator" .Values.draft.accelerator).
*/}}
{{- define "specrec.tolerations" -}}
{{- $tolerations := list }}
{{- if and (ne .accelerator.kind "none") .accelerator.tolerateGpuTaint }}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- $tolerations = concat $tolerations (default list .tolerations) }}
{{- with $tolerations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep counts against it, then the server drains for
drainSeconds, plus a few seconds for the process to exit before SIGKILL.
*/}}
{{- define "specrec.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.drainSeconds 5 }}
{{- end }}

{{/*
preStop hook: keep serving while the endpoint is removed from EndpointSlices and routers, so no
new request lands on a pod that is about to stop. Uses the kubelet's sleep action (no shell needed
in distroless images).
*/}}
{{- define "specrec.lifecycle" -}}
preStop:
  sleep:
    seconds: {{ .Values.shutdown.preStopSleepSeconds }}
{{- end }}

{{/*
OpenTelemetry SDK environment for the Python services (orchestrator and drafter).
Call with (dict "ctx" $ "service" "specrec-draft").
*/}}
{{- define "specrec.otelEnv" -}}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- if .ctx.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .ctx.Values.otel.endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .ctx.Values.otel.samplerRatio | toString | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end }}

{{/*
Environment shared by the Python services: where the model artifacts are and how long the server
may drain after SIGTERM (kept equal to the chart's shutdown.drainSeconds).
*/}}
{{- define "specrec.commonEnv" -}}
- name: SPECREC_ARTIFACTS
  value: {{ .Values.artifacts.path | quote }}
- name: SPECREC_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.shutdown.drainSeconds | toString | quote }}
{{- end }}

{{/*
Volumes and mounts shared by the Python services: a writable /tmp (the root filesystem is read-only)
and, when artifacts.existingClaim is set, the artifacts PVC mounted read-only over the baked-in copy.
*/}}
{{- define "specrec.commonVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.artifacts.existingClaim }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ .Values.artifacts.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{/*
Mounts matching specrec.commonVolumes.
*/}}
{{- define "specrec.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.artifacts.existingClaim }}
- name: artifacts
  mountPath: {{ .Values.artifacts.path }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Peers allowed to scrape a component's metrics port (NetworkPolicy "from" entries).
*/}}
{{- define "specrec.metricsPeers" -}}
{{- with .Values.networkPolicy.metricsScrapers }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The torch device of a component from its accelerator: a pod holding a GPU or MIG slice must use it.
Call with .Values.draft.accelerator.
*/}}
{{- define "specrec.device" -}}
{{- ternary "cpu" "cuda" (eq .kind "none") }}
{{- end }}

{{/*
Where a Python service listens: every interface of the pod (its default, loopback, is unreachable from other pods
and from the kubelet's probes), on the ports the chart declares. Call with (dict "prefix" "SPECREC_DRAFT" "ports" $v.containerPorts).
*/}}
{{- define "specrec.listenEnv" -}}
- name: SPECREC_HOST
  value: "0.0.0.0"
- name: {{ .prefix }}_PORT
  value: {{ .ports.grpc | toString | quote }}
- name: {{ .prefix }}_METRICS_PORT
  value: {{ .ports.metrics | toString | quote }}
{{- end }}

{{/*
The Secret holding one component's TLS identity (tls.crt, tls.key, ca.crt: what cert-manager writes);
required when tls.enabled. Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.tlsSecretName" -}}
{{- $secret := (index .ctx.Values.tls .component).secretName }}
{{- if not $secret }}
{{- fail (printf "tls.%s.secretName is required when tls.enabled is true: the name of an existing Secret holding tls.crt, tls.key and ca.crt" .component) }}
{{- end }}
{{- $secret }}
{{- end }}

{{/*
Secret volumes of one component: its TLS identity when tls.enabled and, for the orchestrator, the API
bearer token when auth.enabled. Whole-Secret mounts (no subPath), so rotated Secrets reach the pod.
Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.secretVolumes" -}}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "specrec.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- if and (eq .component "orchestrator") .ctx.Values.auth.enabled }}
{{- if not .ctx.Values.auth.existingSecret }}
{{- fail "auth.existingSecret is required when auth.enabled is true: the name of an existing Secret holding the API bearer token" }}
{{- end }}
- name: auth-token
  secret:
    secretName: {{ .ctx.Values.auth.existingSecret }}
    items:
      - key: {{ .ctx.Values.auth.secretKey }}
        path: token
    defaultMode: 0440
{{- end }}
{{- end }}

{{/*
Mounts matching specrec.secretVolumes. Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.secretVolumeMounts" -}}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  mountPath: {{ .ctx.Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if and (eq .component "orchestrator") .ctx.Values.auth.enabled }}
- name: auth-token
  mountPath: /etc/specrec/auth
  readOnly: true
{{- end }}
{{- end }}

{{/*
TLS and token environment of a Python service (specrec.security reads SPECREC_TLS_*, SPECREC_PROBE_PORT,
SPECREC_AUTH_TOKEN_FILE). The drafter requires client certificates when tls.mutual; the orchestrator's
API when tls.clientAuthOnApi. The orchestrator checks its peers' certificates against their Service
names, also when it dials pod IPs. Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.securityEnv" -}}
{{- $t := .ctx.Values.tls }}
{{- $ns := .ctx.Release.Namespace }}
{{- if $t.enabled }}
- name: SPECREC_TLS_CERT
  value: {{ printf "%s/tls.crt" $t.mountPath | quote }}
- name: SPECREC_TLS_KEY
  value: {{ printf "%s/tls.key" $t.mountPath | quote }}
- name: SPECREC_TLS_CA
  value: {{ printf "%s/ca.crt" $t.mountPath | quote }}
- name: SPECREC_TLS_CLIENT_AUTH
  value: {{ ternary $t.clientAuthOnApi $t.mutual (eq .component "orchestrator") | ternary "1" "0" | quote }}
{{- if ne .component "triton" }}{{/* Triton's probes are HTTP: specrec-target has no probe port */}}
- name: SPECREC_PROBE_PORT
  value: {{ $t.probePort | toString | quote }}
{{- end }}
{{- if eq .component "orchestrator" }}
- name: SPECREC_DRAFT_TLS_NAME
  value: {{ printf "%s.%s.svc" (include "specrec.componentName" (dict "ctx" .ctx "component" "draft")) $ns | quote }}
- name: SPECREC_TARGET_TLS_NAME
  value: {{ printf "%s.%s.svc" (include "specrec.componentName" (dict "ctx" .ctx "component" "triton")) $ns | quote }}
{{- end }}
{{- end }}
{{- if and (eq .component "orchestrator") .ctx.Values.auth.enabled }}
- name: SPECREC_AUTH_TOKEN_FILE
  value: /etc/specrec/auth/token
{{- end }}
{{- end }}

{{/*
The port of the orchestrator's and drafter's gRPC probes: kubelet's gRPC probe cannot speak TLS, so with
tls.enabled it checks the plaintext health-only listener on tls.probePort.
Call with (dict "ctx" $ "port" .Values.draft.containerPorts.grpc).
*/}}
{{- define "specrec.probePort" -}}
{{- ternary .ctx.Values.tls.probePort .port .ctx.Values.tls.enabled }}
{{- end }}
