{{/* Names, labels and shared fragments of the aiflow-operator chart. */}}

{{- define "aiflow-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; kept to 63 characters, the limit of a label value and a DNS label. */}}
{{- define "aiflow-operator.fullname" -}}
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

{{- define "aiflow-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods; never change them after a release, selectors are immutable. */}}
{{- define "aiflow-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aiflow-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "aiflow-operator.labels" -}}
helm.sh/chart: {{ include "aiflow-operator.chart" . }}
{{ include "aiflow-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aiflow
{{- end }}

{{- define "aiflow-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aiflow-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "aiflow-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The operator's stage image per tier, as $AIFLOW_STAGE_IMAGES: device=IMAGE,edge=IMAGE,cloud=IMAGE. */}}
{{- define "aiflow-operator.stageImages" -}}
{{- $root := . -}}
{{- $images := list -}}
{{- range $tier := list "device" "edge" "cloud" -}}
{{- $kind := index $root.Values.stageImages.tiers $tier -}}
{{- $image := index $root.Values.stageImages $kind -}}
{{- $images = append $images (printf "%s=%s:%s" $tier $image.repository ($image.tag | default $root.Chart.AppVersion)) -}}
{{- end -}}
{{- join "," $images -}}
{{- end }}

{{- define "aiflow-operator.peeringName" -}}
{{- default (include "aiflow-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "aiflow-operator.linkProbe.fullname" -}}
{{- printf "%s-link-probe" (include "aiflow-operator.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{- define "aiflow-operator.linkProbe.image" -}}
{{- $repository := .Values.linkProbe.image.repository | default .Values.image.repository }}
{{- $tag := .Values.linkProbe.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
The namespaces whose namespaced resources the operator touches: the watched ones, or none when it
watches all namespaces (then a ClusterRole carries those rules).
*/}}
{{- define "aiflow-operator.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}
