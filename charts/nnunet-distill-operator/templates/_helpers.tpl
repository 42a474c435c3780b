{{/*
Names. Truncated to 63 characters because some Kubernetes name fields are limited to that (DNS-1123 label).
*/}}
{{- define "nnunet-distill-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nnunet-distill-operator.fullname" -}}
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

{{- define "nnunet-distill-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. Selector labels are a stable subset: a Deployment's selector is immutable, so it must
not carry the chart version.
*/}}
{{- define "nnunet-distill-operator.labels" -}}
{{ include "nnunet-distill-operator.labelsFor" (dict "root" . "component" "operator") }}
{{- end }}

{{- define "nnunet-distill-operator.labelsFor" -}}
helm.sh/chart: {{ include "nnunet-distill-operator.chart" .root }}
app.kubernetes.io/name: {{ include "nnunet-distill-operator.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: nnunet-distill
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nnunet-distill-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nnunet-distill-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "nnunet-distill-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nnunet-distill-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false (name an existing ServiceAccount)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: a digest wins over a tag; the tag defaults to the chart's appVersion so that chart and
operator versions move together.
*/}}
{{- define "nnunet-distill-operator.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "nnunet-distill-operator.image" -}}
{{- include "nnunet-distill-operator.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "nnunet-distill-operator.trainerImage" -}}
{{- include "nnunet-distill-operator.imageRef" (dict "image" .Values.trainer.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "nnunet-distill-operator.monitorNamespace" -}}
{{- default .root.Release.Namespace .namespace }}
{{- end }}
