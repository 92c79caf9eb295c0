{{- define "beluga.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "beluga.fullname" -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" }}{{- end -}}

{{- define "beluga.labels" -}}
app.kubernetes.io/name: {{ include "beluga.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "beluga.selector" -}}
app.kubernetes.io/name: {{ include "beluga.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "beluga.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}

{{/* Where the pool appears inside containers. */}}
{{- define "beluga.poolPath" -}}
{{- if eq .Values.pool.kind "devdax" -}}{{ .Values.pool.devdax.path }}{{- else -}}/pool/beluga-pool{{- end -}}
{{- end -}}

{{- define "beluga.poolVolume" -}}
- name: pool
  hostPath:
{{- if eq .Values.pool.kind "devdax" }}
    path: {{ .Values.pool.devdax.path }}
    type: CharDevice
{{- else }}
    path: {{ .Values.pool.memory.hostPath }}
    type: DirectoryOrCreate
{{- end }}
- name: models
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- end -}}

{{- define "beluga.poolMount" -}}
- name: pool
  mountPath: {{ if eq .Values.pool.kind "devdax" }}{{ .Values.pool.devdax.path }}{{ else }}/pool{{ end }}
- name: models
  mountPath: {{ .Values.model.hostPath }}
  readOnly: true
{{- end -}}

{{/* Mapping device-DAX memory needs locked pages (and the device); tmpfs does not. */}}
{{- define "beluga.poolSecurity" -}}
{{- if eq .Values.pool.kind "devdax" }}
securityContext:
  capabilities:
    add: ["IPC_LOCK"]
{{- end }}
{{- end -}}

{{- define "beluga.envFrom" -}}
- configMapRef:
    name: {{ include "beluga.fullname" . }}-settings
{{- end -}}

{{- define "beluga.workersService" -}}{{ include "beluga.fullname" . }}-workers{{- end -}}
{{- define "beluga.metadataService" -}}{{ include "beluga.fullname" . }}-metadata{{- end -}}
