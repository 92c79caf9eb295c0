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

{{- define "beluga.workersService" -}}{{ include "beluga.fullname" . }}-workers{{- end -}}
{{- define "beluga.metadataService" -}}{{ include "beluga.fullname" . }}-metadata{{- end -}}
{{- define "beluga.metadataHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "beluga.metadataService" .) .Release.Namespace -}}
{{- end -}}
{{/* The component label of the pods that run vLLM engines (the pool's clients). */}}
{{- define "beluga.engineComponent" -}}{{ if .Values.ray.enabled }}ray{{ else }}worker{{ end }}{{- end -}}

{{/* Where the pool appears inside containers. */}}
{{- define "beluga.poolPath" -}}
{{- if eq .Values.pool.kind "devdax" -}}{{ .Values.pool.devdax.path }}{{- else -}}/pool/beluga-pool{{- end -}}
{{- end -}}

{{/* "true" when the device-DAX node reaches the containers through a hostPath, which only a privileged
container may open (the device cgroup blocks it otherwise); empty when a device plugin hands it over. */}}
{{- define "beluga.devdaxPrivileged" -}}
{{- if and (eq .Values.pool.kind "devdax") (not .Values.pool.devdax.resourceName) -}}
{{- if not .Values.pool.devdax.privileged -}}
{{- fail "pool.devdax.resourceName is empty: name the device plugin resource that hands out the device-DAX node, or set pool.devdax.privileged=true to open it through a hostPath from privileged containers (see the README)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* The pool token: a Secret with a `token` entry, mounted read-only into every pod that talks to the pool. */}}
{{- define "beluga.tokenSecret" -}}
{{- .Values.pool.token.existingSecret | default (printf "%s-pool-token" (include "beluga.fullname" .)) -}}
{{- end -}}
{{- define "beluga.tokenPath" -}}/etc/beluga/pool-token/token{{- end -}}

{{/* The connector's kv_connector_extra_config as the chart sets it (the pool path and the RPC port go
beside it: `beluga worker --pool ... --pool-tcp-port ...`): TCP to the metadata server's Service, the
pool token, and the one coherence mode the metadata server is started with. */}}
{{- define "beluga.connectorExtra" -}}
{{- $chart := dict "transport" "tcp" "tcp_host" (include "beluga.metadataHost" .) "token_file" (include "beluga.tokenPath" .)
                   "coherence" .Values.pool.coherence -}}
{{- merge $chart (deepCopy (.Values.workers.connector.extraConfig | default dict)) | toJson -}}
{{- end -}}

{{/* Volumes of a pod that maps the pool: the pool itself (unless a device plugin provides it), the models,
the pool token, and the scratch folders. */}}
{{- define "beluga.poolVolumes" -}}
- name: models
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
- name: pool-token
  secret:
    secretName: {{ include "beluga.tokenSecret" . }}
    defaultMode: 0440  # root:fsGroup, read-only
    items:
      - {key: token, path: token}
{{- if eq .Values.pool.kind "memory" }}
- name: pool
  hostPath:
    path: {{ .Values.pool.memory.hostPath }}
    type: DirectoryOrCreate
{{- else if include "beluga.devdaxPrivileged" . }}
- name: pool
  hostPath:
    path: {{ .Values.pool.devdax.path }}
    type: CharDevice
{{- end }}
{{ include "beluga.scratchVolumes" . }}
{{- end -}}

{{- define "beluga.poolMounts" -}}
- {name: models, mountPath: {{ .Values.model.hostPath }}, readOnly: true}
- {name: pool-token, mountPath: {{ include "beluga.tokenPath" . | dir }}, readOnly: true}
{{- if eq .Values.pool.kind "memory" }}
- {name: pool, mountPath: /pool}
{{- else if include "beluga.devdaxPrivileged" . }}
- {name: pool, mountPath: {{ .Values.pool.devdax.path }}}
{{- end }}
{{ include "beluga.scratchMounts" . }}
{{- end -}}

{{/* The root filesystem is read-only: what Python, vLLM, torch and Ray write goes to /tmp and to HOME
(caches), both emptyDirs; HOME is set in the settings ConfigMap. */}}
{{- define "beluga.scratchVolumes" -}}
- {name: tmp, emptyDir: {}}
- {name: home, emptyDir: {}}
{{- end -}}
{{- define "beluga.scratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: {{ include "beluga.home" . }}}
{{- end -}}
{{- define "beluga.home" -}}/home/beluga{{- end -}}

{{/* Resources of a pod: .resources, plus .gpus GPUs, plus (.pool) the device plugin's device-DAX node. */}}
{{- define "beluga.resources" -}}
{{- $r := deepCopy (.resources | default dict) -}}
{{- $limits := $r.limits | default dict -}}
{{- if .gpus }}{{ $_ := set $limits "nvidia.com/gpu" .gpus }}{{ end -}}
{{- $pool := .root.Values.pool -}}
{{- if and .pool (eq $pool.kind "devdax") $pool.devdax.resourceName }}{{ $_ := set $limits $pool.devdax.resourceName 1 }}{{ end -}}
{{- if $limits }}{{ $_ := set $r "limits" $limits }}{{ end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Pod security: seccomp RuntimeDefault everywhere; non-root, except (by default) the pods that map the
pool, whose device node or tmpfs folder on the node belongs to root (security.poolPodsRunAsRoot). */}}
{{- define "beluga.podSecurityContext" -}}
{{- $s := .root.Values.security -}}
{{- if and .pool (or $s.poolPodsRunAsRoot (include "beluga.devdaxPrivileged" .root)) -}}
runAsNonRoot: false
runAsUser: 0
{{- else -}}
runAsNonRoot: true
runAsUser: {{ $s.runAsUser }}
runAsGroup: {{ $s.runAsGroup }}
{{- end }}
fsGroup: {{ $s.fsGroup }}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* Container security: every capability dropped but IPC_LOCK where the pool is mapped (device-DAX pages
and the GPU's registration of the pool are locked memory), no privilege escalation, a read-only root. */}}
{{- define "beluga.containerSecurityContext" -}}
{{- if and .pool (include "beluga.devdaxPrivileged" .root) -}}
privileged: true  # pool.devdax.privileged: the device node through a hostPath (see the README)
{{- else -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
  {{- if .pool }}
  add: ["IPC_LOCK"]
  {{- end }}
{{- end }}
readOnlyRootFilesystem: true
{{- end -}}

{{- define "beluga.envFrom" -}}
- configMapRef:
    name: {{ include "beluga.fullname" . }}-settings
{{- end -}}
