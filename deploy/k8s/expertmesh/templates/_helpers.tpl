{{/* Names, labels, shared env and the placement plan -> Ray Serve config (mirrors control/serve_config.py). */}}

{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "expertmesh.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Label every Ray pod (head and workers) carries: the NetworkPolicy and the PDB select on it. */}}
{{- define "expertmesh.poolLabel" -}}
expertmesh.io/expert-pool: {{ include "expertmesh.fullname" . | quote }}
{{- end -}}

{{- define "expertmesh.image" -}}
{{- $tag := .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- if .flavored -}}{{- $tag = printf "%s-%s" $tag .ctx.Values.image.flavor -}}{{- end -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .repo $tag -}}
{{- end -}}

{{/* Base URL of the routers' Service (vLLM's OpenAI server with the plugin): the gateway's and the controller's
--router, and EXPERTMESH_ROUTER. */}}
{{- define "expertmesh.routerURL" -}}
{{- printf "http://%s-router:%v" (include "expertmesh.fullname" .) (int .Values.ports.router) -}}
{{- end -}}

{{- define "expertmesh.directoryAddress" -}}
{{- printf "%s-directory:%v" (include "expertmesh.fullname" .) (int .Values.ports.directory) -}}
{{- end -}}

{{/* KubeRay's Service for the RayService's active head (it names it <rayservice>-head-svc): the dashboard. */}}
{{- define "expertmesh.dashboardURL" -}}
{{- printf "http://%s-experts-head-svc:8265" (include "expertmesh.fullname" .) -}}
{{- end -}}

{{- define "expertmesh.controllerStatusURL" -}}
{{- printf "http://%s-controller:%v/status" (include "expertmesh.fullname" .) (int .Values.ports.controller) -}}
{{- end -}}

{{- define "expertmesh.modelPath" -}}
{{- printf "%s/%s" (.Values.model.mountPath | trimSuffix "/") .Values.model.dir -}}
{{- end -}}

{{/* The custom Ray resource only the head offers; the ExpertDirectory deployment asks for it. */}}
{{- define "expertmesh.directoryResource" -}}expertmesh-directory{{- end -}}

{{- define "expertmesh.otelEndpoint" -}}
{{- if .Values.otel.endpoint -}}{{ .Values.otel.endpoint }}
{{- else -}}{{ printf "http://%s-otel-collector:4317" (include "expertmesh.fullname" .) }}{{- end -}}
{{- end -}}

{{/* Env every expertmesh process gets: bind all interfaces, advertise the pod IP, where the others are. */}}
{{- define "expertmesh.env" -}}
- name: EXPERTMESH_BIND_HOST
  value: 0.0.0.0
- name: EXPERTMESH_ADVERTISE_HOST
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
- name: EXPERTMESH_DIRECTORY
  value: {{ include "expertmesh.directoryAddress" . | quote }}
- name: EXPERTMESH_ROUTER
  value: {{ include "expertmesh.routerURL" . | quote }}
- name: EXPERTMESH_REPLICA_PORTS
  value: {{ .Values.ports.replicaRange | quote }}
{{- if .Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ include "expertmesh.otelEndpoint" . | quote }}
{{- end }}
{{- range $name, $value := .Values.settings }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.commonEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The replica tunables set in experts.replica, as Serve application args (ReplicaSettings.serve_args()):
snake_case names, unset (null) ones left out. Returns JSON. */}}
{{- define "expertmesh.replicaArgs" -}}
{{- $r := .Values.experts.replica -}}
{{- $out := dict -}}
{{- range $key, $camel := dict "lease_seconds" "leaseSeconds" "max_wait_ms" "maxWaitMs" "max_batch_rows" "maxBatchRows" "inline_rows" "inlineRows" "compute_threads" "computeThreads" -}}
{{- if and (hasKey $r $camel) (not (kindIs "invalid" (get $r $camel))) -}}
{{- $v := get $r $camel -}}
{{- if has $key (list "max_batch_rows" "inline_rows" "compute_threads") -}}{{- $v = int $v -}}{{- end -}}
{{- $_ := set $out $key $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Model volume (pvc or init-filled emptyDir) and /dev/shm: (dict "ctx" $ "shm" size). */}}
{{- define "expertmesh.volumes" -}}
- name: models
{{- if eq .ctx.Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .ctx.Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .ctx.Values.model.source "init" }}
  emptyDir:
    sizeLimit: {{ .ctx.Values.model.init.sizeLimit }}
{{- else }}
{{- fail (printf "model.source must be pvc or init, got %q" .ctx.Values.model.source) }}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end -}}

{{- define "expertmesh.modelMount" -}}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
{{- end }}
- name: dshm
  mountPath: /dev/shm
{{- end -}}

{{/* The init container that fills the model volume (model.source=init); nothing otherwise. */}}
{{- define "expertmesh.modelInit" -}}
{{- if eq .Values.model.source "init" }}
- name: fetch-model
  image: {{ .Values.model.init.image | default (include "expertmesh.image" (dict "ctx" . "repo" .Values.image.experts "flavored" true)) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["sh", "-c", {{ printf "test -f \"$MODEL_DIR/config.json\" || { %s; }" .Values.model.init.command | quote }}]
  env:
    - name: MODEL_DIR
      value: {{ include "expertmesh.modelPath" . | quote }}
    {{- with .Values.model.init.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml .Values.model.init.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end -}}

{{/* Autoscaling settings completed from the schema defaults (plan.py's Autoscaling). Key by key, not sprig
`merge`, which would replace an explicit 0 by the default. Returns JSON. */}}
{{- define "expertmesh.autoscaling" -}}
{{- $given := . | default dict -}}
{{- $out := dict -}}
{{- range $k, $default := dict "target_tokens_per_second" 2000.0 "upscale_delay_s" 3.0 "downscale_delay_s" 15.0 -}}
{{- $_ := set $out $k (hasKey $given $k | ternary (get $given $k) $default) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The placement plan normalised exactly as PlacementPlan.model_dump(mode="json", exclude_none=True) writes it:
defaults filled (a group's own `autoscaling` is completed from the schema defaults, not from the plan's, as in
plan.py), cross-field rules checked with clear errors. values.schema.json (generated from plan.py) has already
checked types, names and unknown fields. Returns JSON.
*/}}
{{- define "expertmesh.plan" -}}
{{- $plan := .Values.experts.plan -}}
{{- $out := dict "version" (hasKey $plan "version" | ternary (int (get $plan "version")) 1) -}}
{{- if and (hasKey $plan "model") (not (kindIs "invalid" (get $plan "model"))) -}}{{- $_ := set $out "model" $plan.model -}}{{- end -}}
{{- $_ := set $out "autoscaling" (include "expertmesh.autoscaling" (get $plan "autoscaling") | fromJson) -}}
{{- $groups := list -}}
{{- $names := dict -}}
{{- range $g := $plan.groups -}}
  {{- if hasKey $names $g.name -}}{{- fail (printf "experts.plan: group names must be unique, %q repeats" $g.name) -}}{{- end -}}
  {{- $_ := set $names $g.name true -}}
  {{- $keys := dict -}}
  {{- range $layer, $experts := $g.keys -}}
    {{- if not (regexMatch "^[0-9]+$" $layer) -}}{{- fail (printf "experts.plan group %s: layer %q is not a non-negative integer" $g.name $layer) -}}{{- end -}}
    {{- /* sort numerically as plan.py does: zero-pad, sortAlpha, back to ints */ -}}
    {{- $padded := list -}}
    {{- range $e := $experts -}}
      {{- if lt (int $e) 0 -}}{{- fail (printf "experts.plan group %s layer %s: expert ids must be non-negative, got %v" $g.name $layer $experts) -}}{{- end -}}
      {{- $padded = append $padded (printf "%012d" (int $e)) -}}
    {{- end -}}
    {{- $sorted := list -}}
    {{- range $e := sortAlpha $padded -}}
      {{- if and $sorted (eq (atoi $e) (last $sorted)) -}}{{- fail (printf "experts.plan group %s layer %s: duplicate expert ids in %v" $g.name $layer $experts) -}}{{- end -}}
      {{- $sorted = append $sorted (atoi $e) -}}
    {{- end -}}
    {{- $_ := set $keys $layer $sorted -}}
  {{- end -}}
  {{- $held := 0 -}}{{- range $keys -}}{{- $held = add $held (len .) -}}{{- end -}}
  {{- if eq (int $held) 0 -}}{{- fail (printf "experts.plan group %s: a group must hold at least one (layer, expert) key" $g.name) -}}{{- end -}}
  {{- $min := hasKey $g "min_replicas" | ternary (int (get $g "min_replicas")) 1 -}}
  {{- $max := hasKey $g "max_replicas" | ternary (int (get $g "max_replicas")) 1 -}}
  {{- if gt $min $max -}}{{- fail (printf "experts.plan group %s: min_replicas %d > max_replicas %d" $g.name $min $max) -}}{{- end -}}
  {{- $group := dict "name" $g.name "keys" $keys "min_replicas" $min "max_replicas" $max -}}
  {{- if and (hasKey $g "initial_replicas") (not (kindIs "invalid" (get $g "initial_replicas"))) -}}
    {{- $initial := int (get $g "initial_replicas") -}}
    {{- if or (lt $initial $min) (gt $initial $max) -}}{{- fail (printf "experts.plan group %s: initial_replicas outside [min_replicas, max_replicas]" $g.name) -}}{{- end -}}
    {{- $_ := set $group "initial_replicas" $initial -}}
  {{- end -}}
  {{- if and (hasKey $g "autoscaling") (not (kindIs "invalid" (get $g "autoscaling"))) -}}
    {{- $_ := set $group "autoscaling" (include "expertmesh.autoscaling" $g.autoscaling | fromJson) -}}
  {{- end -}}
  {{- /* placement over Ray nodes (plan.py: zone, a soft preference; resources, a hard pin) */ -}}
  {{- if and (hasKey $g "zone") (not (kindIs "invalid" (get $g "zone"))) -}}{{- $_ := set $group "zone" $g.zone -}}{{- end -}}
  {{- if and (hasKey $g "resources") (not (kindIs "invalid" (get $g "resources"))) -}}{{- $_ := set $group "resources" $g.resources -}}{{- end -}}
  {{- $groups = append $groups $group -}}
{{- end -}}
{{- $_ := set $out "groups" $groups -}}
{{- toJson $out -}}
{{- end -}}

{{/* serveConfigV2: same structure as build_serve_config(plan, model_path, directory, num_cpus=, num_gpus=,
directory_resource=, replica=): the directory application, then one application per plan group whose args are the
group's name and keys plus the replica tunables (so changing one group never restarts another). Returns JSON (a
YAML document too). */}}
{{- define "expertmesh.serveConfig" -}}
{{- $plan := include "expertmesh.plan" . | fromJson -}}
{{- $replica := dict "num_cpus" .Values.experts.replica.numCpus -}}
{{- if .Values.experts.replica.numGpus -}}{{- $_ := set $replica "num_gpus" .Values.experts.replica.numGpus -}}{{- end -}}
{{- $directoryOptions := dict "num_cpus" 0 "resources" (dict (include "expertmesh.directoryResource" .) 1) -}}
{{- $directory := include "expertmesh.directoryAddress" . -}}
{{- $model := include "expertmesh.modelPath" . -}}
{{- $replicaArgs := include "expertmesh.replicaArgs" . | fromJson -}}
{{- $directoryApp := dict "name" "expertmesh-directory" "route_prefix" nil "import_path" "expertmesh.experts.app:build_directory" "args" (dict "directory" $directory) "deployments" (list (dict "name" "ExpertDirectory" "num_replicas" 1 "ray_actor_options" $directoryOptions "health_check_period_s" 1.0)) -}}
{{- $apps := list $directoryApp -}}
{{- range $g := $plan.groups -}}
  {{- $start := hasKey $g "initial_replicas" | ternary (get $g "initial_replicas") (max 1 (int $g.min_replicas)) -}}
  {{- $args := dict "model" $model "group" (dict "name" $g.name "keys" $g.keys) "directory" $directory -}}
  {{- range $k, $v := $replicaArgs -}}{{- $_ := set $args $k $v -}}{{- end -}}
  {{- $options := deepCopy $replica -}}
  {{- if $g.zone -}}
    {{- $_ := set $options "label_selector" (dict "expertmesh.io/zone" $g.zone) -}}
    {{- $_ := set $options "fallback_strategy" (list (dict "label_selector" (dict "expertmesh.io/zone" (printf "!%s" $g.zone)))) -}}
  {{- end -}}
  {{- if $g.resources -}}{{- $_ := set $options "resources" $g.resources -}}{{- end -}}
  {{- $deployment := dict "name" $g.name "num_replicas" (int $start) "ray_actor_options" $options "health_check_period_s" 1.0 -}}
  {{- $apps = append $apps (dict "name" (printf "experts-%s" $g.name) "route_prefix" nil "import_path" "expertmesh.experts.app:build_group" "args" $args "deployments" (list $deployment)) -}}
{{- end -}}
{{- toJson (dict "applications" $apps) -}}
{{- end -}}

{{/* The cluster credential (core/auth.py): its Secret, mounted as a directory (never subPath: the kubelet then
updates the file in place on a rotation, and the processes re-read it) in every pod that serves or calls internal
gRPC (router, controller, Ray head and workers: directory and expert replicas), named by
EXPERTMESH_CLUSTER_TOKEN_FILE. */}}
{{- define "expertmesh.clusterTokenSecret" -}}
{{- .Values.clusterToken.existingSecret | default (printf "%s-cluster-token" (include "expertmesh.fullname" .)) -}}
{{- end -}}

{{- define "expertmesh.clusterTokenDir" -}}/var/run/secrets/expertmesh/cluster-token{{- end -}}

{{- define "expertmesh.clusterTokenEnv" -}}
- name: EXPERTMESH_CLUSTER_TOKEN_FILE
  value: {{ printf "%s/%s" (include "expertmesh.clusterTokenDir" .) .Values.clusterToken.secretKey | quote }}
{{- end -}}

{{- define "expertmesh.clusterTokenMount" -}}
- name: cluster-token
  mountPath: {{ include "expertmesh.clusterTokenDir" . }}
  readOnly: true
{{- end -}}

{{- define "expertmesh.clusterTokenVolume" -}}
- name: cluster-token
  secret:
    secretName: {{ include "expertmesh.clusterTokenSecret" . }}
    # Read-only; readable by the container's user whatever its uid (the Ray images run as a non-root user and the
    # chart sets no fsGroup). Only this pod's containers see the mount.
    defaultMode: 0444
{{- end -}}
