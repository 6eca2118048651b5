{{/*
Names, labels and small computed values shared by the templates.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "kro.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name prefix of every object: `<release>-<chart>`, or just the release name when it
already contains the chart name; fullnameOverride replaces it. DNS labels stop at 63 chars.
*/}}
{{- define "kro.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pod; never change them (Deployment selectors are immutable). */}}
{{- define "kro.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kro.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the release but the `helm test` ones. */}}
{{- define "kro.labels" -}}
{{ include "kro.selectorLabels" . }}
app.kubernetes.io/component: operator
{{ include "kro.releaseLabels" . }}
{{- end }}

{{/*
Labels of the `helm test` objects: their own name and component, so that no selector of the
operator's pods (metrics Service, PodDisruptionBudget) ever picks the test pod.
*/}}
{{- define "kro.testLabels" -}}
app.kubernetes.io/name: {{ include "kro.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{ include "kro.releaseLabels" . }}
{{- end }}

{{/* Labels shared by everything the release renders. */}}
{{- define "kro.releaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kafka-retry-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "kro.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kro.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from repository, tag (default: appVersion) and optional digest. */}}
{{- define "kro.imageRef" -}}
{{- $repository := index . 0 }}
{{- $tag := index . 1 }}
{{- $digest := index . 2 }}
{{- if $digest }}
{{- printf "%s@%s" $repository $digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/* The operator image. */}}
{{- define "kro.image" -}}
{{- include "kro.imageRef" (list .Values.image.repository (default .Chart.AppVersion .Values.image.tag) .Values.image.digest) }}
{{- end }}

{{/* The tier-worker image: the operator's image unless workers.image overrides it. */}}
{{- define "kro.workerImage" -}}
{{- if or .Values.workers.image.repository .Values.workers.image.tag }}
{{- include "kro.imageRef" (list (default .Values.image.repository .Values.workers.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.workers.image.tag) "") }}
{{- else }}
{{- include "kro.image" . }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches in `namespaces` scope: validated, de-duplicated, sorted.
Fails the render with a clear message when the scope and the list disagree, both ways: under
`cluster` scope a list would be a promise the ClusterRole does not keep.
*/}}
{{- define "kro.watchNamespaces" -}}
{{- if eq .Values.rbac.scope "namespaces" }}
{{- if not .Values.watchNamespaces }}
{{- fail "rbac.scope=namespaces needs watchNamespaces: the list of namespaces to watch" }}
{{- end }}
{{- .Values.watchNamespaces | uniq | sortAlpha | join "," }}
{{- else if .Values.watchNamespaces }}
{{- fail "watchNamespaces needs rbac.scope=namespaces: with rbac.scope=cluster the operator watches, and may write in, every namespace. Set rbac.scope=namespaces to confine it to watchNamespaces (recommended), or drop watchNamespaces" }}
{{- end }}
{{- end }}
