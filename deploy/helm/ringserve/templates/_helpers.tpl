{{/* Names and labels. */}}
{{- define "ringserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ringserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ringserve.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Label on the Ray pods: the NetworkPolicy lets only pods with it reach Redis. */}}
{{- define "ringserve.rayClientLabel" -}}
ringserve.io/redis-client: {{ .Release.Name | quote }}
{{- end -}}

{{- define "ringserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ringserve.redisHost" -}}
{{- printf "%s-redis" (include "ringserve.fullname" .) -}}
{{- end -}}

{{/* The Redis URL the Ray pods use; ${REDIS_PASSWORD} is expanded by ringserve from the pod env. */}}
{{- define "ringserve.redisUrl" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://:${REDIS_PASSWORD}@%s:6379/0" (include "ringserve.redisHost" .) -}}
{{- end -}}
{{- end -}}

{{- define "ringserve.redisSecretName" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.passwordSecret.name -}}
{{- else -}}
{{- default (printf "%s-redis" (include "ringserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "ringserve.redisSecretKey" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.passwordSecret.key -}}
{{- else -}}
{{- .Values.redis.auth.key -}}
{{- end -}}
{{- end -}}

{{- define "ringserve.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "ringserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* The gRPC API: the port on the head pod the API Service targets (TLS, else Serve's plaintext
port), its port name, and the Service's own port. */}}
{{- define "ringserve.apiPortName" -}}
{{- if .Values.serve.tls.enabled }}grpc-tls{{ else }}serve-grpc{{ end -}}
{{- end -}}

{{- define "ringserve.apiTargetPort" -}}
{{- if .Values.serve.tls.enabled }}{{ .Values.serve.tls.port }}{{ else }}{{ .Values.serve.grpcPort }}{{ end -}}
{{- end -}}

{{- define "ringserve.apiServicePort" -}}
{{- if .Values.serve.grpcService.port }}{{ .Values.serve.grpcService.port }}
{{- else if .Values.serve.tls.enabled }}443
{{- else }}{{ .Values.serve.grpcPort }}{{ end -}}
{{- end -}}

{{/* Labels of this release's Ray pods (head and workers), for Services and NetworkPolicies. */}}
{{- define "ringserve.headSelector" -}}
{{ include "ringserve.selector" . }}
app.kubernetes.io/component: ray-head
{{- end -}}

{{/* Values that cannot work together fail here, naming the fix. */}}
{{- define "ringserve.validate" -}}
{{- if hasKey .Values.serve "serviceType" }}
{{- fail "serve.serviceType was removed: the Ray head's Service (dashboard, GCS, Ray client) is always ClusterIP now; expose the gRPC API with serve.grpcService.type (and serve.tls), see deploy/README.md section 3" }}
{{- end }}
{{- $tls := .Values.serve.tls }}
{{- if and $tls.enabled (not $tls.secretName) }}
{{- fail "serve.tls.enabled needs serve.tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and $tls.enabled (or (eq (int $tls.port) (int .Values.serve.grpcPort)) (eq (int $tls.port) (int .Values.serve.httpPort))) }}
{{- fail "serve.tls.port must differ from serve.grpcPort and serve.httpPort" }}
{{- end }}
{{- if and $tls.clientCA.secretName (not $tls.enabled) }}
{{- fail "serve.tls.clientCA is for TLS: set serve.tls.enabled and serve.tls.secretName too" }}
{{- end }}
{{- $svc := .Values.serve.grpcService }}
{{- if and (ne $svc.type "ClusterIP") (not $tls.enabled) (not $svc.allowPlaintext) }}
{{- fail (printf "serve.grpcService.type %s would put plaintext gRPC (API keys in the clear) outside the cluster: enable serve.tls, or set serve.grpcService.allowPlaintext if TLS ends in front of it" $svc.type) }}
{{- end }}
{{- end -}}

{{/* The ringserve ServeConfig (cluster/config.py) the Serve app is built from. */}}
{{- define "ringserve.serveArgs" -}}
{{- $g := .Values.groups -}}
{{- $b := .Values.billing -}}
grpc_port: {{ .Values.serve.grpcPort }}
http_port: {{ .Values.serve.httpPort }}
max_receive_bytes: {{ .Values.serve.maxReceiveBytes | int64 }}
{{- if .Values.serve.tls.enabled }}
tls:
  port: {{ .Values.serve.tls.port }}
  cert_file: /etc/ringserve/tls/tls.crt
  key_file: /etc/ringserve/tls/tls.key
  {{- if .Values.serve.tls.clientCA.secretName }}
  client_ca_file: /etc/ringserve/client-ca/{{ .Values.serve.tls.clientCA.key }}
  {{- end }}
{{- end }}
plaintext_peers: any
redis_url: {{ include "ringserve.redisUrl" . | quote }}
{{- if $b.redisUrl }}
billing_redis_url: {{ $b.redisUrl | quote }}
{{- end }}
model: {{ .Values.model | quote }}
groups: {{ $g.count }}
group:
  sp: {{ $g.sp }}
  model: {{ .Values.model | quote }}
  num_cpus_per_rank: {{ .Values.worker.cpusPerGpu }}
  num_gpus_per_rank: 1
  strategy: STRICT_PACK
  prefill_chunk: {{ $g.prefillChunk }}
  collective_timeout_s: {{ $g.collectiveTimeoutSeconds }}
  kv_device_bytes: {{ $g.kvDeviceBytes | int64 }}
  kv_host_bytes: {{ $g.kvHostBytes | int64 }}
  redis_url: {{ include "ringserve.redisUrl" . | quote }}
  kv_device_idle_s: {{ $g.idleSeconds.device }}
  kv_host_idle_s: {{ $g.idleSeconds.host }}
  kv_cold_idle_s: {{ $g.idleSeconds.cold }}
api_keys_file: /etc/ringserve/api-keys/api-keys.yaml
limits:
  max_sessions: {{ .Values.limits.maxSessions }}
  max_tokens: {{ .Values.limits.maxTokens | int64 }}
default_ttl_s: {{ .Values.serve.defaultTtlSeconds }}
max_ttl_s: {{ .Values.serve.maxTtlSeconds }}
max_generate_tokens: {{ .Values.serve.maxGenerateTokens }}
progress_chunk: {{ .Values.serve.progressChunk }}
billing:
  currency: {{ $b.currency | quote }}
  retention: {{ toJson $b.retention }}
  prefill_per_mtok: {{ $b.prefillPerMtok }}
  cached_per_mtok: {{ $b.cachedPerMtok }}
  generated_per_mtok: {{ $b.generatedPerMtok }}
  min_session_tokens: {{ $b.minSessionTokens }}
  meter_interval_s: {{ $b.meterIntervalSeconds }}
{{- end -}}

{{/* Env, volumes and mounts shared by the head and worker containers. */}}
{{- define "ringserve.podEnv" -}}
{{- if include "ringserve.redisSecretName" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ringserve.redisSecretName" . }}
      key: {{ include "ringserve.redisSecretKey" . }}
{{- end }}
- name: RAY_SERVE_ENABLE_TASK_EVENTS
  value: "0"
# Serve's gRPC proxy: the largest message it receives (RESOURCE_EXHAUSTED beyond)
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ .Values.serve.maxReceiveBytes | int64 | quote }}
{{- end -}}

{{/* Head only: where Serve's gRPC proxy finds its TLS port and certificates (cluster/tls.py). */}}
{{- define "ringserve.tlsEnv" -}}
{{- with .Values.serve.tls }}
{{- if .enabled }}
- name: RINGSERVE_TLS_PORT
  value: {{ .port | quote }}
- name: RINGSERVE_TLS_CERT
  value: /etc/ringserve/tls/tls.crt
- name: RINGSERVE_TLS_KEY
  value: /etc/ringserve/tls/tls.key
{{- if .clientCA.secretName }}
- name: RINGSERVE_TLS_CLIENT_CA
  value: /etc/ringserve/client-ca/{{ .clientCA.key }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "ringserve.tlsVolumeMounts" -}}
{{- if .Values.serve.tls.enabled }}
- name: tls
  mountPath: /etc/ringserve/tls
  readOnly: true
{{- if .Values.serve.tls.clientCA.secretName }}
- name: client-ca
  mountPath: /etc/ringserve/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "ringserve.tlsVolumes" -}}
{{- if .Values.serve.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.serve.tls.secretName }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- if .Values.serve.tls.clientCA.secretName }}
- name: client-ca
  secret:
    secretName: {{ .Values.serve.tls.clientCA.secretName }}
    items:
      - {key: {{ .Values.serve.tls.clientCA.key }}, path: {{ .Values.serve.tls.clientCA.key }}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "ringserve.volumeMounts" -}}
- name: api-keys
  mountPath: /etc/ringserve/api-keys
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if .Values.modelVolume.mountPath }}
- name: models
  mountPath: {{ .Values.modelVolume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ringserve.volumes" -}}
- name: api-keys
  secret:
    secretName: {{ include "ringserve.apiKeysSecret" . }}
{{- if .Values.modelVolume.mountPath }}
- name: models
  {{- toYaml (omit .Values.modelVolume "mountPath") | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ringserve.rayPorts" -}}
- {name: gcs-server, containerPort: 6379}
- {name: dashboard, containerPort: 8265}
- {name: client, containerPort: 10001}
- {name: serve, containerPort: {{ .Values.serve.httpPort }}}
- {name: serve-grpc, containerPort: {{ .Values.serve.grpcPort }}}
{{- if .Values.metrics.enabled }}
- {name: metrics, containerPort: {{ .Values.metrics.port }}}
{{- end }}
{{- end -}}

{{/* Head only: where the Ray dashboard finds Grafana and Prometheus for its embedded metrics charts. */}}
{{- define "ringserve.dashboardEnv" -}}
{{- with .Values.metrics.rayDashboard }}
{{- range $name, $value := dict "RAY_GRAFANA_HOST" .grafanaHost "RAY_GRAFANA_IFRAME_HOST" .grafanaIframeHost "RAY_PROMETHEUS_HOST" .prometheusHost "RAY_PROMETHEUS_NAME" .prometheusName }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
