{{/*
Naming and labelling helpers shared by every component.

Components and their values keys:
  component label   values key      binary role(s)
  api               .Values.api           api,admin
  worker            .Values.worker        worker
  kafka-ingress     .Values.kafkaIngress  ingress   (Kafka consumers, not a Kubernetes Ingress)
  scheduler         .Values.scheduler     scheduler
  relay             .Values.relay         relay
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "ledgerflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Component suffixes (-kafka-ingress is the longest,
14 characters) are appended to it, so it is cut at 48 characters to keep
every object name within 63.
*/}}
{{- define "ledgerflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "ledgerflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every object of the release (no component). */}}
{{- define "ledgerflow.commonLabels" -}}
helm.sh/chart: {{ include "ledgerflow.chart" . }}
app.kubernetes.io/name: {{ include "ledgerflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "ledgerflow.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ledgerflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of one component's objects.
Call with (dict "root" $ "component" "worker").
*/}}
{{- define "ledgerflow.labels" -}}
{{ include "ledgerflow.commonLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component. These are immutable on a Deployment, so
they carry neither the version nor the chart: only name, instance, component.
Call with (dict "root" $ "component" "worker").
*/}}
{{- define "ledgerflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ledgerflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Name of one component's objects: <fullname>-<component>. */}}
{{- define "ledgerflow.componentName" -}}
{{- printf "%s-%s" (include "ledgerflow.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Service account used by the component pods. */}}
{{- define "ledgerflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ledgerflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the ConfigMap holding the non-secret environment. */}}
{{- define "ledgerflow.configMapName" -}}
{{- printf "%s-config" (include "ledgerflow.fullname" .) }}
{{- end }}

{{/* Image tag: image.tag, or the chart's appVersion when empty. */}}
{{- define "ledgerflow.imageTag" -}}
{{- toString (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Full image reference; a digest, when given, wins over the tag. */}}
{{- define "ledgerflow.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "ledgerflow.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
Non-secret environment of every process, as a flat map of strings. It is the
data of the ConfigMap and, inline, the environment of the migration Job (which
runs as a pre-install hook, before the ConfigMap exists).
*/}}
{{- define "ledgerflow.configData" -}}
KAFKA_BROKERS: {{ .Values.kafka.brokers | quote }}
LEDGERFLOW_API_ADDR: {{ printf "0.0.0.0:%d" (int .Values.ports.http) | quote }}
LEDGERFLOW_ADMIN_ADDR: {{ printf "0.0.0.0:%d" (int .Values.ports.admin) | quote }}
LEDGERFLOW_OPS_ADDR: {{ printf "0.0.0.0:%d" (int .Values.ports.ops) | quote }}
LEDGERFLOW_SHUTDOWN_GRACE_SECS: {{ .Values.config.shutdownGraceSeconds | toString | quote }}
RUST_LOG: {{ .Values.config.logLevel | quote }}
LEDGERFLOW_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
{{- if .Values.database.pgbouncer }}
LEDGERFLOW_PGBOUNCER: "true"
{{- end }}
{{- /* Set only when given: the binary reads a set-but-empty URL as a bad URL. */}}
{{- with .Values.exchange.url }}
LEDGERFLOW_EXCHANGE_URL: {{ . | quote }}
{{- end }}
{{- with .Values.notifier.url }}
LEDGERFLOW_NOTIFIER_URL: {{ . | quote }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
OTEL_TRACES_SAMPLER: {{ $.Values.tracing.sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ $.Values.tracing.samplerArg | quote }}
{{- end }}
{{- with .Values.withdrawalPolicy }}
LEDGERFLOW_WITHDRAWAL_POLICY: {{ include "ledgerflow.withdrawalPolicyJson" . | quote }}
{{- end }}
{{- range $key, $value := .Values.config.extraEnv }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
withdrawalPolicy as the binary's JSON (kebab-case keys, amounts as strings;
an asset set to null is left out).
*/}}
{{- define "ledgerflow.withdrawalPolicyJson" -}}
{{- $out := dict }}
{{- range $asset, $p := . }}
{{- if $p }}
{{- $a := dict }}
{{- with $p.approvalThreshold }}{{ $_ := set $a "approval-threshold" . }}{{ end }}
{{- with $p.secondApprovalThreshold }}{{ $_ := set $a "second-approval-threshold" . }}{{ end }}
{{- with $p.dailyLimit }}{{ $_ := set $a "daily-limit" . }}{{ end }}
{{- $_ := set $out $asset $a }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Release-wide checks, rendered once (from configmap.yaml). Each failure names
the value to set.
*/}}
{{- define "ledgerflow.validate" -}}
{{- if not .Values.database.existingSecret }}
{{- fail "database.existingSecret is required: name a Secret in the release namespace whose key database.existingSecretKey holds the PostgreSQL URL (the chart never stores credentials in values)" }}
{{- end }}
{{- if .Values.api.enabled }}
{{- if not .Values.admin.existingSecret }}
{{- fail "admin.existingSecret is required when api.enabled: name a Secret holding the admin credentials / bootstrap token (its keys become environment variables of the api pods)" }}
{{- end }}
{{- if not .Values.webhooks.existingSecret }}
{{- fail "webhooks.existingSecret is required when api.enabled: name a Secret holding LEDGERFLOW_WEBHOOK_SECRETS_<PROVIDER> keys (its keys become environment variables of the api pods)" }}
{{- end }}
{{- end }}
{{- if and .Values.notifier.existingSecret (not .Values.notifier.url) }}
{{- fail "notifier.existingSecret is set but notifier.url is empty: without a provider URL notifications go to the in-process simulated provider and the API key would never be used; set notifier.url" }}
{{- end }}
{{- range $key, $_ := .Values.config.extraEnv }}
{{- if eq $key "LEDGERFLOW_NOTIFIER_API_KEY" }}
{{- fail "config.extraEnv.LEDGERFLOW_NOTIFIER_API_KEY would put a secret in values (and in a ConfigMap): name a Secret in notifier.existingSecret instead" }}
{{- end }}
{{- if has $key (list "DATABASE_URL" "KAFKA_BROKERS" "LEDGERFLOW_API_ADDR" "LEDGERFLOW_ADMIN_ADDR" "LEDGERFLOW_OPS_ADDR" "LEDGERFLOW_SHUTDOWN_GRACE_SECS" "RUST_LOG" "LEDGERFLOW_LOG_FORMAT" "LEDGERFLOW_PGBOUNCER" "LEDGERFLOW_EXCHANGE_URL" "LEDGERFLOW_NOTIFIER_URL" "LEDGERFLOW_WITHDRAWAL_POLICY" "OTEL_EXPORTER_OTLP_ENDPOINT" "OTEL_TRACES_SAMPLER" "OTEL_TRACES_SAMPLER_ARG" "OTEL_SERVICE_NAME") }}
{{- fail (printf "config.extraEnv.%s is set by the chart from another value; set that value instead (see README)" $key) }}
{{- end }}
{{- end }}
{{- end }}
