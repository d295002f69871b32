{{/*
Resource templates shared by the three components. Each templates/<component>/<kind>.yaml decides
whether to render and passes its own values; the shape of the resource lives here once.
*/}}

{{/*
ServiceAccount of one component, token not automounted (pods opt in).
Call with (dict "ctx" $ "component" "draft" "sa" .Values.draft.serviceAccount).
*/}}
{{- define "specrec.serviceAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "specrec.serviceAccountName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "specrec.labels" . | nindent 4 }}
  {{- with .sa.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end }}

{{/*
PodDisruptionBudget of one component.
Call with (dict "ctx" $ "component" "draft" "pdb" .Values.draft.podDisruptionBudget).
*/}}
{{- define "specrec.podDisruptionBudget" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "specrec.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "specrec.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "specrec.selectorLabels" . | nindent 6 }}
{{- end }}

{{/*
Ingress NetworkPolicy of one component: `peers` may reach the `port` named port, the metrics
scrapers may reach the port named "metrics", nothing else gets in. With no rules at all the policy
denies all ingress.
Call with (dict "ctx" $ "component" "triton" "port" "grpc" "peers" (list ...)).
*/}}
{{- define "specrec.networkPolicy" -}}
{{- $scrapers := .ctx.Values.networkPolicy.metricsScrapers }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "specrec.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "specrec.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "specrec.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  {{- if or .peers $scrapers }}
  ingress:
    {{- with .peers }}
    - from:
        {{- toYaml . | nindent 8 }}
      ports:
        - port: {{ $.port }}
          protocol: TCP
    {{- end }}
    {{- with $scrapers }}
    - from:
        {{- toYaml . | nindent 8 }}
      ports:
        - port: metrics
          protocol: TCP
    {{- end }}
  {{- else }}
  ingress: []
  {{- end }}
{{- end }}

{{/*
ServiceMonitor of one component, scraping the Service port named "metrics".
Call with (dict "ctx" $ "component" "draft").
*/}}
{{- define "specrec.serviceMonitor" -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "specrec.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "specrec.labels" . | nindent 4 }}
    {{- with .ctx.Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "specrec.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ .ctx.Values.serviceMonitor.interval }}
{{- end }}
