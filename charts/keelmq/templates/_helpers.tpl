{{/* The chart name, shortened to what a DNS label allows. */}}
{{- define "keelmq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: prefix of every object this chart creates. */}}
{{- define "keelmq.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s-operator" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keelmq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keelmq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keelmq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "keelmq.labels" -}}
helm.sh/chart: {{ include "keelmq.chart" . }}
{{ include "keelmq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keelmq
{{- end }}

{{- define "keelmq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keelmq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease: one per release, so that two releases in one
namespace do not share it. */}}
{{- define "keelmq.leaseName" -}}
{{- default (include "keelmq.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "keelmq.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the metrics Service is rendered (a ServiceMonitor needs it). */}}
{{- define "keelmq.metricsService" -}}
{{- if or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled }}true{{ end }}
{{- end }}

{{/*
The operator's permissions, files/operator-rbac.json (the output of
`keelmq-operator rbac`), as RBAC rules of one bucket:
  "namespaced": namespaced resources, granted in the watched namespaces
  "cluster":    cluster-scoped resources
  "lease":      the leader-election Lease, granted in the release namespace
                only; the verbs that can be are narrowed to the Lease's name
Each rule keeps one entry's verbs, for one API group. Call with
(dict "root" $ "bucket" "namespaced").
*/}}
{{- define "keelmq.rbacRules" -}}
{{- $root := .root }}
{{- $bucket := .bucket }}
{{- $perms := $root.Files.Get "files/operator-rbac.json" | fromJsonArray }}
{{- range $p := $perms }}
{{- range $g := $p.apiGroups }}
{{- $resources := list }}
{{- range $r := $p.resources }}
{{- $isLease := and (eq $g "coordination.k8s.io") (eq $r "leases") }}
{{- $b := ternary "lease" (ternary "namespaced" "cluster" (default false $p.namespaced)) $isLease }}
{{- if eq $b $bucket }}
{{- $resources = append $resources $r }}
{{- end }}
{{- end }}
{{- if and $resources (eq $bucket "lease") }}
{{- /* create, list and watch cannot be narrowed to one name; the rest can */}}
{{- $open := list }}
{{- $named := list }}
{{- range $v := $p.verbs }}
{{- if has $v (list "create" "list" "watch" "deletecollection") }}
{{- $open = append $open $v }}
{{- else }}
{{- $named = append $named $v }}
{{- end }}
{{- end }}
{{- if $open }}
- apiGroups: [{{ $g | quote }}]
  resources: {{ toJson $resources }}
  verbs: {{ toJson $open }}
{{- end }}
{{- if $named }}
- apiGroups: [{{ $g | quote }}]
  resources: {{ toJson $resources }}
  resourceNames: [{{ include "keelmq.leaseName" $root | quote }}]
  verbs: {{ toJson $named }}
{{- end }}
{{- else if $resources }}
- apiGroups: [{{ $g | quote }}]
  resources: {{ toJson $resources }}
  verbs: {{ toJson $p.verbs }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
