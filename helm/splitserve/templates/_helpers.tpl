{{/* Names, labels and the pod pieces shared by the head and worker groups. */}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* KubeRay appends suffixes such as "-head-svc" and "-prefill-worker-xxxxx": keep the base short. */}}
{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "splitserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "splitserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "splitserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Fixed paths: the generated config points at them. */}}
{{- define "splitserve.modelPath" -}}/model{{- end }}
{{- define "splitserve.configDir" -}}/etc/splitserve{{- end }}

{{- define "splitserve.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "splitserve.fullname" .)) .Values.rayAuth.existingSecret }}
{{- end }}

{{- define "splitserve.authSecretName" -}}
{{- default (printf "%s-auth" (include "splitserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "splitserve.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The cluster config that `splitserve serve` reads (splitserve.cluster.config). */}}
{{- define "splitserve.config" -}}
{{- $c := .Values.config }}
{{- $prefill := dict "instances" (int .Values.prefill.replicas) "tp" (int .Values.prefill.tp) "sp" (int .Values.prefill.sp) "sp_algorithm" .Values.prefill.spAlgorithm }}
{{- $decode := dict "instances" (int .Values.decode.replicas) "tp" (int .Values.decode.tp) }}
{{- $auto := .Values.autoscaling | default dict }}
{{- $ray := merge (dict "address" "auto" "role_resources" true "autoscaler" ($auto.enabled | default false)) (deepCopy $c.ray) }}
{{- $cfg := dict "model" (include "splitserve.configModel" .) "dtype" $c.dtype "device" $c.device "prefill" $prefill "decode" $decode "engine" $c.engine "kv_transfer" $c.kv_transfer "ray" $ray "max_queued_requests" (int $c.max_queued_requests) }}
{{- with $c.fault_tolerance }}{{- $_ := set $cfg "fault_tolerance" . }}{{- end }}
{{- with $c.routing }}{{- $_ := set $cfg "routing" . }}{{- end }}
{{- with $c.max_prompt_bytes }}{{- $_ := set $cfg "max_prompt_bytes" (int .) }}{{- end }}
{{- if $auto.enabled }}
{{- $bounds := dict "min_prefill" (int $auto.prefill.minReplicas) "max_prefill" (int $auto.prefill.maxReplicas) "min_decode" (int $auto.decode.minReplicas) "max_decode" (int $auto.decode.maxReplicas) }}
{{- $_ := set $cfg "placement" (dict "online" (merge $bounds (deepCopy ($auto.planner | default dict)))) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Environment of every Ray container (and of the server, which is a Ray driver). */}}
{{- define "splitserve.rayEnv" -}}
- name: HOME
  value: /tmp
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "splitserve.rayAuthSecretName" . }}
      key: auth_token
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "splitserve.modelVolume" -}}
{{- if ne .Values.model.source "preset" }}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.claimName is required when model.source is pvc" .Values.model.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ required "model.path is required when model.source is hostPath" .Values.model.path }}
    type: Directory
{{- else if eq .Values.model.source "image" }}
  image:
    reference: {{ required "model.reference is required when model.source is image" .Values.model.reference }}
    pullPolicy: {{ .Values.model.pullPolicy }}
{{- else }}
{{- fail (printf "model.source must be pvc, hostPath, image or preset, got %q" .Values.model.source) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "splitserve.modelMount" -}}
{{- if ne .Values.model.source "preset" }}
- name: model
  mountPath: {{ include "splitserve.modelPath" . }}
  readOnly: true
{{- with .Values.model.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The config's model: a preset baked into the image, or the mounted checkpoint. */}}
{{- define "splitserve.configModel" -}}
{{- if eq .Values.model.source "preset" }}
{{- required "model.preset is required when model.source is preset" .Values.model.preset }}
{{- else }}
{{- include "splitserve.modelPath" . }}
{{- end }}
{{- end }}

{{/* Volumes every Ray pod has; Ray needs a writable /tmp/ray, which lives on the tmp emptyDir. */}}
{{- define "splitserve.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}

{{- define "splitserve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- end }}

{{/* Pod metadata for a group: {root, component}. */}}
{{- define "splitserve.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "splitserve.labels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level fields for a group: {root, group}. Group nodeSelector keys win over the global ones,
     tolerations add up, a non-empty group affinity replaces the global one. */}}
{{- define "splitserve.podScheduling" -}}
{{- $root := .root }}
{{- $group := .group -}}
serviceAccountName: {{ include "splitserve.serviceAccountName" $root }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $nodeSelector := merge (deepCopy ($group.nodeSelector | default dict)) ($root.Values.nodeSelector | default dict) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat ($root.Values.tolerations | default list) ($group.tolerations | default list) }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := $group.affinity | default $root.Values.affinity }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's resources with the GPU limit forced: {resources, gpus}. */}}
{{- define "splitserve.gpuResources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- $limits := omit ($res.limits | default dict) "nvidia.com/gpu" }}
{{- $requests := omit ($res.requests | default dict) "nvidia.com/gpu" }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- end }}
{{- $out := dict }}
{{- with $limits }}{{ $_ := set $out "limits" . }}{{ end }}
{{- with $requests }}{{ $_ := set $out "requests" . }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/* A Ray worker group: {root, name, values, gpus}. One pod hosts one instance. */}}
{{/* A worker group's pod bounds: fixed at its replicas, or autoscaling's bounds around them when enabled. */}}
{{- define "splitserve.replicaBounds" -}}
{{- $auto := .root.Values.autoscaling | default dict }}
{{- if $auto.enabled }}
{{- $b := index $auto .name }}
{{- if gt (int $b.minReplicas) (int $b.maxReplicas) }}
{{- fail (printf "autoscaling.%s: minReplicas (%d) is above maxReplicas (%d)" .name (int $b.minReplicas) (int $b.maxReplicas)) }}
{{- end }}
{{- if or (lt (int .values.replicas) (int $b.minReplicas)) (gt (int .values.replicas) (int $b.maxReplicas)) }}
{{- fail (printf "%s.replicas (%d) must lie within autoscaling.%s [%d, %d]" .name (int .values.replicas) .name (int $b.minReplicas) (int $b.maxReplicas)) }}
{{- end }}
min: {{ int $b.minReplicas }}
max: {{ int $b.maxReplicas }}
{{- else }}
min: {{ int .values.replicas }}
max: {{ int .values.replicas }}
{{- end }}
{{- end }}

{{- define "splitserve.workerGroup" -}}
{{- $root := .root -}}
{{- $bounds := include "splitserve.replicaBounds" (dict "root" $root "name" .name "values" .values) | fromYaml }}
- groupName: {{ .name }}
  replicas: {{ int .values.replicas }}
  minReplicas: {{ $bounds.min }}
  maxReplicas: {{ $bounds.max }}
  rayStartParams:
    {{- /* splitserve_<group>: the launcher (ray.role_resources) places only this role's instances here */}}
    {{- $roleResources := printf "'{\"splitserve_%s\": %d}'" .name (int .gpus) }}
    {{- $params := merge (dict "num-gpus" (toString .gpus) "resources" $roleResources) (.values.rayStartParams | default dict) }}
    {{- toYaml $params | nindent 4 }}
  template:
    metadata:
      {{- include "splitserve.podMetadata" (dict "root" $root "component" .name) | nindent 6 }}
    spec:
      {{- include "splitserve.podScheduling" (dict "root" $root "group" .values) | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "splitserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "splitserve.rayEnv" $root | nindent 12 }}
          resources:
            {{- include "splitserve.gpuResources" (dict "resources" .values.resources "gpus" .gpus) | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          lifecycle:
            preStop:
              exec:
                command: ["/bin/sh", "-c", "ray stop"]
          volumeMounts:
            {{- include "splitserve.modelMount" $root | nindent 12 }}
            {{- include "splitserve.scratchMounts" $root | nindent 12 }}
      volumes:
        {{- include "splitserve.modelVolume" $root | nindent 8 }}
        {{- include "splitserve.scratchVolumes" $root | nindent 8 }}
{{- end }}
