{{/*
Object builders shared by the component folders (api/, worker/,
kafka-ingress/, scheduler/, relay/). Each component file calls one of them
with a dict:

  root       the top-level context ($)
  component  the component label and name suffix, e.g. "kafka-ingress"
  key        the values key, e.g. "kafkaIngress" (used in error messages)
  values     the component's values, e.g. .Values.kafkaIngress
and, for ledgerflow.deployment only:
  roles      the --roles argument, e.g. "api,admin"
  extraArgs  further arguments after --roles (list, may be empty)
  ports      container port names to expose, from .Values.ports (list)
  probePort  port name the kubelet probes /healthcheck and /readyz on
  envFrom    names of extra Secrets whose keys become environment variables
  notifierApiKey  true to read LEDGERFLOW_NOTIFIER_API_KEY from
             notifier.existingSecret (when set): only the pods that send
*/}}

{{- define "ledgerflow.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $grace := int $root.Values.config.shutdownGraceSeconds -}}
{{- if le (int $v.terminationGracePeriodSeconds) $grace -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be longer than config.shutdownGraceSeconds (%d): the kubelet sends SIGKILL when it runs out, before in-flight work has drained" .key (int $v.terminationGracePeriodSeconds) $grace) -}}
{{- end -}}
{{- $args := concat (list "run" "--roles" .roles) (default (list) .extraArgs) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "ledgerflow.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "ledgerflow.labels" . | nindent 4 }}
spec:
  {{- if not (or $v.autoscaling.enabled (dig "keda" "enabled" false $v)) }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: {{ $root.Values.revisionHistoryLimit }}
  # Never go below the current capacity during a rollout: new pods become
  # ready before old ones are asked to drain.
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "ledgerflow.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "ledgerflow.labels" . | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Rolls the pods when the non-secret configuration changes.
        checksum/config: {{ include "ledgerflow.configData" $root | sha256sum }}
        {{- if $root.Values.metrics.scrapeAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.ports.ops | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "ledgerflow.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "ledgerflow.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- range $args }}
            - {{ . | quote }}
            {{- end }}
          ports:
            {{- range .ports }}
            - name: {{ . }}
              containerPort: {{ index $root.Values.ports . }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "ledgerflow.configMapName" $root }}
            {{- with $root.Values.kafka.existingSecret }}
            - secretRef:
                name: {{ . }}
            {{- end }}
            {{- range .envFrom }}
            - secretRef:
                name: {{ . }}
            {{- end }}
          env:
            - name: DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.database.existingSecret }}
                  key: {{ $root.Values.database.existingSecretKey }}
            {{- if and .notifierApiKey $root.Values.notifier.existingSecret }}
            - name: LEDGERFLOW_NOTIFIER_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.notifier.existingSecret }}
                  key: {{ $root.Values.notifier.existingSecretKey }}
            {{- end }}
            {{- if $root.Values.tracing.otlpEndpoint }}
            - name: OTEL_SERVICE_NAME
              value: {{ printf "ledgerflow-%s" .component | quote }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          livenessProbe:
            httpGet:
              path: /healthcheck
              port: {{ .probePort }}
            {{- toYaml $v.livenessProbe | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: {{ .probePort }}
            {{- toYaml $v.readinessProbe | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        # The root filesystem is read-only; /tmp is the only writable path.
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.tmpSizeLimit }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $v.spreadAcrossZones }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: topology.kubernetes.io/zone
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "ledgerflow.selectorLabels" . | nindent 14 }}
      {{- end }}
{{- end }}

{{/* ClusterIP Service exposing the ops port (/metrics, /healthcheck, /readyz). */}}
{{- define "ledgerflow.opsService" -}}
{{- $root := .root -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "ledgerflow.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "ledgerflow.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "ledgerflow.selectorLabels" . | nindent 4 }}
  ports:
    - name: ops
      port: {{ $root.Values.ports.ops }}
      targetPort: ops
      protocol: TCP
{{- end }}

{{/* autoscaling/v2 HorizontalPodAutoscaler on CPU and/or memory utilization. */}}
{{- define "ledgerflow.hpa" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $a := $v.autoscaling -}}
{{- if and $a.enabled (dig "keda" "enabled" false $v) -}}
{{- fail (printf "%s.autoscaling.enabled and %s.keda.enabled are both true: KEDA creates an HPA of its own, and two autoscalers on one Deployment fight; choose one" .key .key) -}}
{{- end -}}
{{- if $a.enabled -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is greater than maxReplicas (%d)" .key (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- if not (or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage) -}}
{{- fail (printf "%s.autoscaling.enabled needs targetCPUUtilizationPercentage and/or targetMemoryUtilizationPercentage" .key) -}}
{{- end -}}
{{- $requests := default (dict) $v.resources.requests -}}
{{- if and $a.targetCPUUtilizationPercentage (not $requests.cpu) -}}
{{- fail (printf "%s.autoscaling.targetCPUUtilizationPercentage needs %s.resources.requests.cpu (utilization is relative to the request)" .key .key) -}}
{{- end -}}
{{- if and $a.targetMemoryUtilizationPercentage (not $requests.memory) -}}
{{- fail (printf "%s.autoscaling.targetMemoryUtilizationPercentage needs %s.resources.requests.memory (utilization is relative to the request)" .key .key) -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "ledgerflow.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "ledgerflow.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "ledgerflow.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- with $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end }}

{{/* policy/v1 PodDisruptionBudget: minAvailable or maxUnavailable, not both. */}}
{{- define "ledgerflow.pdb" -}}
{{- $root := .root -}}
{{- $p := .values.podDisruptionBudget -}}
{{- if $p.enabled -}}
{{- $hasMin := not (kindIs "invalid" $p.minAvailable) -}}
{{- $hasMax := not (kindIs "invalid" $p.maxUnavailable) -}}
{{- if and $hasMin $hasMax -}}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" .key) -}}
{{- end -}}
{{- if not (or $hasMin $hasMax) -}}
{{- fail (printf "%s.podDisruptionBudget.enabled needs minAvailable or maxUnavailable" .key) -}}
{{- end -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "ledgerflow.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "ledgerflow.labels" . | nindent 4 }}
spec:
  {{- if $hasMin }}
  minAvailable: {{ $p.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $p.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "ledgerflow.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end }}

{{/*
AWS Load Balancer Controller annotations for one Ingress, from an `alb`
values block (ingress.alb or adminIngress.alb).
*/}}
{{- define "ledgerflow.albAnnotations" -}}
alb.ingress.kubernetes.io/scheme: {{ .scheme | quote }}
alb.ingress.kubernetes.io/target-type: {{ .targetType | quote }}
alb.ingress.kubernetes.io/ip-address-type: {{ .ipAddressType | quote }}
{{- with .loadBalancerName }}
alb.ingress.kubernetes.io/load-balancer-name: {{ . | quote }}
{{- end }}
{{- with .groupName }}
alb.ingress.kubernetes.io/group.name: {{ . | quote }}
{{- end }}
alb.ingress.kubernetes.io/listen-ports: {{ .listenPorts | toJson | quote }}
{{- with .certificateArn }}
alb.ingress.kubernetes.io/certificate-arn: {{ . | quote }}
{{- end }}
{{- with .sslPolicy }}
alb.ingress.kubernetes.io/ssl-policy: {{ . | quote }}
{{- end }}
{{- with .sslRedirect }}
alb.ingress.kubernetes.io/ssl-redirect: {{ . | toString | quote }}
{{- end }}
alb.ingress.kubernetes.io/healthcheck-protocol: {{ .healthcheckProtocol | quote }}
alb.ingress.kubernetes.io/healthcheck-port: {{ .healthcheckPort | toString | quote }}
alb.ingress.kubernetes.io/healthcheck-path: {{ .healthcheckPath | quote }}
alb.ingress.kubernetes.io/healthcheck-interval-seconds: {{ .healthcheckIntervalSeconds | toString | quote }}
{{- with .inboundCidrs }}
alb.ingress.kubernetes.io/inbound-cidrs: {{ join "," . | quote }}
{{- end }}
{{- with .tags }}
{{- $tags := list }}
{{- range $k, $val := . }}
{{- $tags = append $tags (printf "%s=%s" $k (toString $val)) }}
{{- end }}
alb.ingress.kubernetes.io/tags: {{ join "," $tags | quote }}
{{- end }}
{{- end }}

{{/*
KEDA ScaledObject of one component, instead of its HPA (the component's HPA
template refuses to render both). Arguments: root, component, key, values
(with a `keda` block: minReplicas, maxReplicas, pollingInterval,
cooldownPeriod, behavior) and triggers (a list of KEDA trigger objects).
*/}}
{{- define "ledgerflow.scaledObject" -}}
{{- $root := .root -}}
{{- $k := .values.keda -}}
{{- if gt (int $k.minReplicas) (int $k.maxReplicas) -}}
{{- fail (printf "%s.keda.minReplicas (%d) is greater than maxReplicas (%d)" .key (int $k.minReplicas) (int $k.maxReplicas)) -}}
{{- end -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "ledgerflow.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "ledgerflow.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "ledgerflow.componentName" . }}
  minReplicaCount: {{ $k.minReplicas }}
  maxReplicaCount: {{ $k.maxReplicas }}
  pollingInterval: {{ $k.pollingInterval }}
  cooldownPeriod: {{ $k.cooldownPeriod }}
  {{- with $k.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    {{- toYaml .triggers | nindent 4 }}
{{- end }}
