{{/*
Names, labels and the gateway config. Everything the templates share lives here.
*/}}

{{/* Chart name (nameOverride wins), trimmed to 63 characters. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: fullnameOverride, else "<release>-<name>" (just the release name when it already contains
the chart name). Trimmed to 40 characters so suffixes like "-pool-<name>" stay within 63.
*/}}
{{- define "switchyard.fullname" -}}
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

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the release's pods (add app.kubernetes.io/component per workload). */}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount name: the given one, else the full name when created, else "default". */}}
{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Pool resource name: <fullname>-pool-<pool name>. Call with (dict "root" $ "pool" $pool). */}}
{{- define "switchyard.poolName" -}}
{{- printf "%s-pool-%s" (include "switchyard.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.redisName" -}}
{{- printf "%s-redis" (include "switchyard.fullname" .) }}
{{- end }}

{{- define "switchyard.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "switchyard.fullname" .)) }}
{{- end }}

{{- define "switchyard.hasApiKeys" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{- define "switchyard.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "switchyard.redisName" .) }}
{{- end }}

{{/* Env var holding an external pool's upstream API key. */}}
{{- define "switchyard.poolKeyEnv" -}}
{{- printf "SWITCHYARD_POOL_%s_API_KEY" (.name | upper | replace "-" "_") }}
{{- end }}

{{/*
Redis URL without credentials ("" when the release has no Redis). The password, when there is one,
reaches the gateway through the SWITCHYARD__REDIS_URL env override (see switchyard.redisEnv).
*/}}
{{- define "switchyard.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:6379/%d" (include "switchyard.redisName" .) .Release.Namespace (int .Values.redis.db) }}
{{- else if .Values.redis.external.url }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Gateway env for Redis credentials: REDIS_PASSWORD from a Secret, then the full URL using it. */}}
{{- define "switchyard.redisEnv" -}}
{{- $secret := "" }}{{ $key := "" }}{{ $url := "" }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled }}
{{- $secret = include "switchyard.redisSecretName" . }}
{{- $key = .Values.redis.auth.existingSecretKey }}
{{- $url = printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:6379/%d" (include "switchyard.redisName" .) .Release.Namespace (int .Values.redis.db) }}
{{- else if and (not .Values.redis.enabled) .Values.redis.external.url .Values.redis.external.passwordSecret.name }}
{{- $secret = .Values.redis.external.passwordSecret.name }}
{{- $key = .Values.redis.external.passwordSecret.key | default "redis-password" }}
{{- $u := urlParse .Values.redis.external.url }}
{{- $url = printf "%s://:$(REDIS_PASSWORD)@%s%s" $u.scheme $u.host $u.path }}
{{- end }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
- name: SWITCHYARD__REDIS_URL
  value: {{ $url | quote }}
{{- end }}
{{- end }}

{{/* Artifact mount folder inside the gateway pods. Call with the artifact name. */}}
{{- define "switchyard.artifactMount" -}}
{{- printf "/etc/switchyard/artifacts/%s" . }}
{{- end }}

{{/* Path the gateway config names for an artifact ("" = none). Call with (dict "name" "router" "a" $a). */}}
{{- define "switchyard.artifactPath" -}}
{{- if eq .a.source "image" }}
{{- .a.path }}
{{- else if ne .a.source "none" }}
{{- include "switchyard.artifactMount" .name }}
{{- end }}
{{- end }}

{{/* ConfigMap name holding an artifact (configMap/files sources). Call with (dict "root" $ "name" "router"). */}}
{{- define "switchyard.artifactConfigMap" -}}
{{- $a := index .root.Values.artifacts .name }}
{{- if eq $a.source "configMap" }}
{{- $a.configMap }}
{{- else }}
{{- printf "%s-%s-artifact" (include "switchyard.fullname" .root) .name }}
{{- end }}
{{- end }}

{{/*
Checksum of both artifacts: rendered files, the user's checksum string, and (on a live cluster) the
content of an existing ConfigMap found by lookup. A change here rolls the gateway.
*/}}
{{- define "switchyard.artifactsChecksum" -}}
{{- $parts := list }}
{{- $deployed := list }}
{{- range .Values.pools }}{{ if eq .mode "deployment" }}{{ $deployed = append $deployed .name }}{{ end }}{{ end }}
{{- if and .Values.networkPolicy.enabled .Values.gateway.serviceMonitor.enabled $deployed (not .Values.networkPolicy.metricsFrom) }}
{{- fail "networkPolicy.metricsFrom: with networkPolicy and gateway.serviceMonitor on, name the peers (your Prometheus) that may scrape the deployment pools' /metrics, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]" }}
{{- end }}
{{- range $name := list "router" "guard" }}
{{- $a := index $.Values.artifacts $name }}
{{- $parts = append $parts (printf "%s:%s:%s" $name $a.source $a.checksum) }}
{{- if eq $a.source "files" }}
{{- $parts = append $parts (toJson $a.files) }}
{{- else if eq $a.source "configMap" }}
{{- $cm := lookup "v1" "ConfigMap" $.Release.Namespace $a.configMap }}
{{- if $cm }}
{{- $parts = append $parts (toJson (dict "data" ($cm.data | default dict) "binaryData" ($cm.binaryData | default dict))) }}
{{- end }}
{{- end }}
{{- end }}
{{- $parts | join "\n" | sha256sum }}
{{- end }}

{{/* Pool of the given name, or the fallback position (first/last) when no pool has that name. */}}
{{- define "switchyard.defaultPool" -}}
{{- $found := "" }}
{{- range .pools }}{{ if eq .name $.want }}{{ $found = .name }}{{ end }}{{ end }}
{{- if $found }}{{ $found }}{{ else if eq .position "first" }}{{ (first .pools).name }}{{ else }}{{ (last .pools).name }}{{ end }}
{{- end }}

{{/*
Gateway engine options → `switchyard engine serve` flags (every EngineOptions key has one; null = the
engine's default; the nested speculation object travels as one JSON flag). Call with the engine dict.
*/}}
{{- define "switchyard.engineArgs" -}}
{{- $flags := dict "max_model_len" "--max-model-len" "max_num_seqs" "--max-num-seqs" "max_num_batched_tokens" "--max-num-batched-tokens" "block_size" "--block-size" "num_kv_blocks" "--num-kv-blocks" "kv_cache_memory_gb" "--kv-cache-memory-gb" "dtype" "--dtype" "quantization" "--quantization" "num_threads" "--num-threads" "kv_retain_s" "--kv-retain-s" "kv_retain_max_share" "--kv-retain-max-share" "kv_offload_gb" "--kv-offload-gb" "program_max_wait_s" "--program-max-wait-s" }}
{{- range $k := keys $flags | sortAlpha }}
{{- if and (hasKey $ $k) (not (kindIs "invalid" (index $ $k))) }}
- {{ index $flags $k | quote }}
- {{ index $ $k | toString | quote }}
{{- end }}
{{- end }}
{{- if and (hasKey . "enable_prefix_caching") (not .enable_prefix_caching) }}
- "--no-prefix-caching"
{{- end }}
{{- if .program_scheduling }}
- "--program-scheduling"
{{- end }}
{{- if .speculation }}
- "--speculation"
- {{ toJson .speculation | quote }}
{{- end }}
{{- end }}

{{/*
The gateway config file (YAML), validated by gateway.settings at start: gateway.config passed
through, plus what the chart knows: host, port, redis_url (without password), pools with their
Service URLs, artifact paths, default routing pools and example-cache backend.
*/}}
{{- define "switchyard.gatewayConfig" -}}
{{- $root := . }}
{{- $cfg := deepCopy (.Values.gateway.config | default dict) }}
{{- /* Helm reads values as YAML 1.1: an unquoted off/on arrives as a boolean. The gateway wants the word. */}}
{{- $cascadeCfg := dig "routing" "cascade" dict $cfg }}
{{- if kindIs "bool" $cascadeCfg.mode }}{{ $_ := set $cascadeCfg "mode" (ternary "on" "off" $cascadeCfg.mode) }}{{ end }}
{{- $cacheCfg := dig "example_cache" dict $cfg }}
{{- if kindIs "bool" $cacheCfg.server_search }}{{ $_ := set $cacheCfg "server_search" (ternary "on" "off" $cacheCfg.server_search) }}{{ end }}
{{- $_ := set $cfg "host" "0.0.0.0" }}
{{- $_ := set $cfg "port" (int .Values.gateway.port) }}
{{- $redisUrl := include "switchyard.redisUrl" . }}
{{- if $redisUrl }}
{{- $_ := set $cfg "redis_url" $redisUrl }}
{{- end }}
{{- $pools := list }}
{{- range $p := .Values.pools }}
{{- $entry := deepCopy ($p.config | default dict) }}
{{- $_ := set $entry "name" $p.name }}
{{- $_ := set $entry "model" $p.model }}
{{- if eq $p.mode "deployment" }}
{{- $_ := set $entry "kind" "remote" }}
{{- $_ := set $entry "urls" (list (printf "http://%s.%s.svc:%d/v1" (include "switchyard.poolName" (dict "root" $root "pool" $p)) $root.Release.Namespace (int ($p.port | default 8001)))) }}
{{- /* the pool's Service is headless: the gateway resolves every ready pod and balances over them */}}
{{- $_ := set $entry "discovery" "dns" }}
{{- $_ := unset $entry "chat_template" }}
{{- $_ := unset $entry "tool_call_parser" }}
{{- /* its pods run the embedded engine: tools and JSON schemas are served there (constrained decoding) */}}
{{- if not (hasKey $entry "supports_tools") }}{{ $_ := set $entry "supports_tools" true }}{{ end }}
{{- if not (hasKey $entry "supports_json_mode") }}{{ $_ := set $entry "supports_json_mode" true }}{{ end }}
{{- else if eq $p.mode "external" }}
{{- $_ := set $entry "kind" "remote" }}
{{- $_ := set $entry "urls" $p.urls }}
{{- if and $p.apiKeySecret $p.apiKeySecret.name }}
{{- $_ := set $entry "api_key_env" (include "switchyard.poolKeyEnv" $p) }}
{{- end }}
{{- else }}
{{- $_ := set $entry "kind" "local" }}
{{- $_ := set $entry "replicas" (int ($p.replicas | default 1)) }}
{{- if $p.engine }}
{{- $_ := set $entry "engine" $p.engine }}
{{- end }}
{{- end }}
{{- $pools = append $pools $entry }}
{{- end }}
{{- $_ := set $cfg "pools" $pools }}
{{- $routing := $cfg.routing | default dict }}
{{- if not $routing.slm_pool }}
{{- $_ := set $routing "slm_pool" (include "switchyard.defaultPool" (dict "pools" .Values.pools "want" "slm" "position" "first")) }}
{{- end }}
{{- if not $routing.llm_pool }}
{{- $_ := set $routing "llm_pool" (include "switchyard.defaultPool" (dict "pools" .Values.pools "want" "llm" "position" "last")) }}
{{- end }}
{{- $routerPath := include "switchyard.artifactPath" (dict "name" "router" "a" .Values.artifacts.router) }}
{{- if $routerPath }}
{{- $_ := set $routing "router_artifact" $routerPath }}
{{- end }}
{{- $_ := set $cfg "routing" $routing }}
{{- $guardPath := include "switchyard.artifactPath" (dict "name" "guard" "a" .Values.artifacts.guard) }}
{{- if $guardPath }}
{{- $guard := $cfg.guard | default dict }}
{{- $_ := set $guard "artifact" $guardPath }}
{{- $_ := set $cfg "guard" $guard }}
{{- end }}
{{- $cache := $cfg.example_cache | default dict }}
{{- if not $cache.backend }}
{{- $_ := set $cache "backend" (ternary "redis" "memory" (ne $redisUrl "")) }}
{{- end }}
{{- $_ := set $cfg "example_cache" $cache }}
{{- if not $cfg.guard }}{{ $_ := unset $cfg "guard" }}{{ end }}
{{- if not $cfg.limits }}{{ $_ := unset $cfg "limits" }}{{ end }}
{{- $workers := int (include "switchyard.gatewayWorkers" .) }}
{{- if gt $workers 1 }}{{ $_ := set $cfg "workers" $workers }}{{ end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Gateway worker processes per pod: gateway.workers, or (null) one per requested CPU, rounded up — 1 with
inProcess pools (every worker would load them) or without a CPU request.
*/}}
{{- define "switchyard.gatewayWorkers" -}}
{{- if not (kindIs "invalid" .Values.gateway.workers) }}{{ int .Values.gateway.workers }}
{{- else }}
{{- $inProcess := false }}
{{- range .Values.pools }}{{ if eq .mode "inProcess" }}{{ $inProcess = true }}{{ end }}{{ end }}
{{- $cpu := toString (dig "requests" "cpu" "" (.Values.gateway.resources | default dict)) }}
{{- if or $inProcess (eq $cpu "") }}1
{{- else if hasSuffix "m" $cpu }}{{ max 1 (int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000.0))) }}
{{- else }}{{ max 1 (int (ceil (float64 $cpu))) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks the schema cannot express; a failed one stops the render with a message naming the value.
*/}}
{{- define "switchyard.validate" -}}
{{- if gt (int (include "switchyard.gatewayWorkers" .)) 1 }}
{{- range .Values.pools }}{{ if eq .mode "inProcess" }}
{{- fail (printf "gateway.workers > 1 needs pools without mode inProcess: every worker would load pools[%s] itself" .name) }}
{{- end }}{{ end }}
{{- end }}
{{- $names := list }}
{{- range .Values.pools }}
{{- if has .name $names }}
{{- fail (printf "pools: name %q is used twice; pool names must be unique" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- if and (eq .mode "external") (not .urls) }}
{{- fail (printf "pools[%s]: mode external needs urls (base URLs ending in /v1)" .name) }}
{{- end }}
{{- if and (ne .mode "external") .urls }}
{{- fail (printf "pools[%s]: urls are only for mode external" .name) }}
{{- end }}
{{- if and (eq .mode "external") .engine }}
{{- fail (printf "pools[%s]: engine options are for modes deployment and inProcess; an external server has its own" .name) }}
{{- end }}
{{- if and (ne .mode "deployment") .gpu }}
{{- fail (printf "pools[%s]: gpu is for mode deployment (inProcess pools run in the gateway pods, which request none)" .name) }}
{{- end }}
{{- if and (eq .mode "deployment") .modelSource (eq (.modelSource.type | default "prepare") "pvc") (not .modelSource.claimName) }}
{{- fail (printf "pools[%s].modelSource: type pvc needs claimName" .name) }}
{{- end }}
{{- if and (eq .mode "deployment") .modelSource (eq (.modelSource.type | default "prepare") "hostPath") (not .modelSource.hostPath) }}
{{- fail (printf "pools[%s].modelSource: type hostPath needs hostPath" .name) }}
{{- end }}
{{- end }}
{{- $routing := .Values.gateway.config.routing | default dict }}
{{- range $key := list "slm_pool" "llm_pool" }}
{{- $ref := index $routing $key }}
{{- if and $ref (not (has $ref $names)) }}
{{- fail (printf "gateway.config.routing.%s = %q is not a pool; pools: %s" $key $ref (join ", " $names)) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.external.url }}
{{- fail "redis: set either redis.enabled (built-in) or redis.external.url, not both" }}
{{- end }}
{{- $cache := .Values.gateway.config.example_cache | default dict }}
{{- if and (eq ($cache.backend | default "") "redis") (not (include "switchyard.redisUrl" .)) }}
{{- fail "gateway.config.example_cache.backend = redis needs Redis: set redis.enabled or redis.external.url" }}
{{- end }}
{{- $deployed := list }}
{{- range .Values.pools }}{{ if eq .mode "deployment" }}{{ $deployed = append $deployed .name }}{{ end }}{{ end }}
{{- if and .Values.networkPolicy.enabled .Values.gateway.serviceMonitor.enabled $deployed (not .Values.networkPolicy.metricsFrom) }}
{{- fail "networkPolicy.metricsFrom: with networkPolicy and gateway.serviceMonitor on, name the peers (your Prometheus) that may scrape the deployment pools' /metrics, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]" }}
{{- end }}
{{- range $name := list "router" "guard" }}
{{- $a := index $.Values.artifacts $name }}
{{- $need := dict "configMap" "configMap" "files" "files" "pvc" "claimName" "hostPath" "hostPath" "image" "path" }}
{{- if and (hasKey $need $a.source) (not (index $a (index $need $a.source))) }}
{{- fail (printf "artifacts.%s: source %s needs artifacts.%s.%s" $name $a.source $name (index $need $a.source)) }}
{{- end }}
{{- end }}
{{- end }}


{{/*
The gateway pod's termination grace period: the value when set, else preStop sleep + drain + 5 s, the drain
being config.shutdown.drain_s or config.limits.request_timeout_s (default 120) + 5 (gateway/settings.py).
*/}}
{{- define "switchyard.gatewayGracePeriod" -}}
{{- $g := .Values.gateway -}}
{{- if kindIs "invalid" $g.terminationGracePeriodSeconds -}}
{{- $config := $g.config | default dict -}}
{{- $limits := $config.limits | default dict -}}
{{- $shutdown := $config.shutdown | default dict -}}
{{- $drain := $shutdown.drain_s | default (add ($limits.request_timeout_s | default 120 | int) 5) -}}
{{- add $g.preStopSleepSeconds ($drain | ceil | int) 5 -}}
{{- else -}}
{{- $g.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}
