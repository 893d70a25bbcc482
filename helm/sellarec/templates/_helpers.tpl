{{/* Chart name, overridable. */}}
{{- define "sellarec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full resource name: <release>-<chart> unless the release name already contains it. */}}
{{- define "sellarec.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sellarec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sellarec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sellarec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sellarec.labels" -}}
helm.sh/chart: {{ include "sellarec.chart" . }}
{{ include "sellarec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sellarec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sellarec.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sellarec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Redis. The URL is built from the subchart's service or from externalRedis.url; the password
never appears in a manifest: it is read from a Secret into REDIS_PASSWORD and spliced into
SELLAREC_REDIS_URL by Kubernetes' $(VAR) expansion.
*/}}

{{/* The Bitnami subchart's full name, computed the way its common.names.fullname does. */}}
{{- define "sellarec.redis.fullname" -}}
{{- if .Values.redis.fullnameOverride -}}
{{- .Values.redis.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "redis" .Values.redis.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the pods talk to a Redis at all. */}}
{{- define "sellarec.redis.configured" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url -}}true{{- end -}}
{{- end -}}

{{/* Secret that holds the Redis password; empty when Redis needs none. */}}
{{- define "sellarec.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- default (include "sellarec.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- else if .Values.externalRedis.url -}}
{{- if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else if .Values.externalRedis.password -}}
{{- include "sellarec.fullname" . -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Key of the password inside sellarec.redis.secretName. */}}
{{- define "sellarec.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- if and .Values.redis.auth.existingSecret .Values.redis.auth.existingSecretPasswordKey -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- required "externalRedis.existingSecretPasswordKey is required with externalRedis.existingSecret" .Values.externalRedis.existingSecretPasswordKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* SELLAREC_REDIS_URL, with $(REDIS_PASSWORD) where the password goes. */}}
{{- define "sellarec.redis.url" -}}
{{- $auth := "" -}}
{{- if include "sellarec.redis.secretName" . -}}
{{- $user := ternary "" .Values.externalRedis.username .Values.redis.enabled -}}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $user -}}
{{- end -}}
{{- if .Values.redis.enabled -}}
{{- $scheme := ternary "rediss" "redis" (.Values.redis.tls.enabled | default false) -}}
{{- $port := dig "master" "service" "ports" "redis" 6379 .Values.redis -}}
{{- printf "%s://%s%s-master:%v/0" $scheme $auth (include "sellarec.redis.fullname" .) $port -}}
{{- else -}}
{{- $url := .Values.externalRedis.url -}}
{{- if not (regexMatch "^(redis|rediss)(\\+cluster)?://[^/@]+" $url) -}}
{{- fail (printf "externalRedis.url must look like redis://host:port/db, rediss://host:port/db or, for a Redis Cluster, redis+cluster://host:port (credentials go in a Secret), got %q" $url) -}}
{{- end -}}
{{- if and $auth (contains "@" $url) -}}
{{- fail "externalRedis.url already carries credentials; drop them from the URL or drop the password settings" -}}
{{- end -}}
{{- $parts := splitn "://" 2 $url -}}
{{- printf "%s://%s%s" $parts._0 $auth $parts._1 -}}
{{- end -}}
{{- end -}}

{{/* Secret that holds the bearer token; empty when the API is open. */}}
{{- define "sellarec.apiToken.secretName" -}}
{{- if .Values.apiToken.enabled -}}
{{- if .Values.apiToken.existingSecret -}}
{{- .Values.apiToken.existingSecret -}}
{{- else if .Values.apiToken.value -}}
{{- include "sellarec.fullname" . -}}
{{- else -}}
{{- fail "apiToken.enabled needs apiToken.existingSecret or apiToken.value" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sellarec.apiToken.secretKey" -}}
{{- if .Values.apiToken.existingSecret -}}
{{- required "apiToken.existingSecretKey is required with apiToken.existingSecret" .Values.apiToken.existingSecretKey -}}
{{- else -}}
api-token
{{- end -}}
{{- end -}}

{{/* "true" when the chart must create its own Secret (for values given inline). */}}
{{- define "sellarec.secret.needed" -}}
{{- $redis := and (not .Values.redis.enabled) .Values.externalRedis.url (not .Values.externalRedis.existingSecret) .Values.externalRedis.password -}}
{{- $token := and .Values.apiToken.enabled (not .Values.apiToken.existingSecret) .Values.apiToken.value -}}
{{- if or $redis $token -}}true{{- end -}}
{{- end -}}

{{/*
Environment shared by the server and the store-load Job: the chart-owned SELLAREC_ settings,
the Redis URL, the bearer token, the `config` map and extraEnv.
*/}}
{{- define "sellarec.env" -}}
{{- $reserved := list "ARTIFACTS" "HOST" "PORT" "CACHE_DIR" "REDIS_URL" "API_TOKEN" -}}
{{- range $key, $value := .Values.config -}}
{{- if has (upper $key) $reserved -}}
{{- fail (printf "config.%s is set by the chart; use the dedicated values (artifacts, models, containerPort, redis/externalRedis, apiToken)" $key) -}}
{{- end -}}
{{- end -}}
- name: SELLAREC_HOST
  value: "0.0.0.0"
- name: SELLAREC_PORT
  value: {{ .Values.containerPort | quote }}
- name: SELLAREC_ARTIFACTS
  value: /artifacts
- name: SELLAREC_CACHE_DIR
  value: /models
- name: HF_HOME
  value: /models/huggingface
- name: SELLAREC_DEVICE
  value: {{ default (ternary "cuda" "cpu" .Values.gpu.enabled) .Values.config.DEVICE | quote }}
{{- range $key, $value := .Values.config }}
{{- if and (ne (upper $key) "DEVICE") (not (eq (toString $value) "" "<nil>")) }}
- name: {{ printf "SELLAREC_%s" (upper $key) }}
  {{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
  value: {{ int64 $value | quote }}
  {{- else }}
  value: {{ toString $value | quote }}
  {{- end }}
{{- end }}
{{- end }}
{{- $redisSecret := include "sellarec.redis.secretName" . }}
{{- if $redisSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redisSecret }}
      key: {{ include "sellarec.redis.secretKey" . }}
{{- end }}
{{- if include "sellarec.redis.configured" . }}
- name: SELLAREC_REDIS_URL
  value: {{ include "sellarec.redis.url" . | quote }}
{{- end }}
{{- $tokenSecret := include "sellarec.apiToken.secretName" . }}
{{- if $tokenSecret }}
- name: SELLAREC_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $tokenSecret }}
      key: {{ include "sellarec.apiToken.secretKey" . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
One volume for models or artifacts. Call with (dict "name" "artifacts" "spec" .Values.artifacts);
type image gives no volume: the path inside the image is used as it is.
*/}}
{{- define "sellarec.volume" -}}
{{- $spec := .spec -}}
{{- if eq $spec.type "pvc" -}}
- name: {{ .name }}
  persistentVolumeClaim:
    claimName: {{ required (printf "%s.existingClaim is required when %s.type is pvc" .name .name) $spec.existingClaim }}
    readOnly: {{ $spec.readOnly | default false }}
{{- else if eq $spec.type "hostPath" -}}
- name: {{ .name }}
  hostPath:
    path: {{ required (printf "%s.hostPath is required when %s.type is hostPath" .name .name) $spec.hostPath }}
    type: Directory
{{- else if eq $spec.type "emptyDir" -}}
- name: {{ .name }}
  emptyDir:
    {{- with $spec.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- else if ne $spec.type "image" -}}
{{- fail (printf "%s.type must be pvc, hostPath, emptyDir or image, got %q" .name $spec.type) -}}
{{- end -}}
{{- end -}}

{{- define "sellarec.volumeMount" -}}
{{- if ne .spec.type "image" -}}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: {{ .spec.readOnly | default false }}
{{- end -}}
{{- end -}}
