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
{{- if .ctx.Values.otel.enabled }}
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
Python backend shared-memory arguments for Triton, derived from the same values that size the
/dev/shm emptyDir, so the two cannot drift apart.
*/}}
{{- define "specrec.tritonShmArgs" -}}
{{- $mib := 1048576 -}}
- --backend-config=python,shm-default-byte-size={{ mul .Values.triton.shm.pythonDefaultMiB $mib }}
- --backend-config=python,shm-growth-byte-size={{ mul .Values.triton.shm.pythonGrowthMiB $mib }}
{{- end }}
