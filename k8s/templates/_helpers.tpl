{{/*
Helpers of the nostr-relay chart.
Component-aware helpers take a dict: (dict "root" $ "component" "gateway").
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "nostr-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name prefix of every resource: fullnameOverride, or <release>-<name>,
or <release> alone when it already contains the chart name. Kept to 40
characters so that "<fullname>-ingest-worker" and friends fit in 63.
*/}}
{{- define "nostr-relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's resources: <fullname>-<component>. */}}
{{- define "nostr-relay.componentName" -}}
{{- printf "%s-%s" (include "nostr-relay.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* chart label value: <name>-<version>. */}}
{{- define "nostr-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of the whole release (stable: never change them). */}}
{{- define "nostr-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nostr-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels of every resource. */}}
{{- define "nostr-relay.labels" -}}
helm.sh/chart: {{ include "nostr-relay.chart" . }}
{{ include "nostr-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nostr-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. */}}
{{- define "nostr-relay.componentSelectorLabels" -}}
{{ include "nostr-relay.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of one component's resources. */}}
{{- define "nostr-relay.componentLabels" -}}
{{ include "nostr-relay.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ServiceAccount the pods run as. */}}
{{- define "nostr-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nostr-relay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "nostr-relay.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret the chart creates for URLs given in values. */}}
{{- define "nostr-relay.secretName" -}}
{{- include "nostr-relay.fullname" . -}}
{{- end -}}

{{/* Whether the chart must create its Secret ("true" or empty). */}}
{{- define "nostr-relay.createSecret" -}}
{{- if or (not .Values.redis.existingSecret) (not .Values.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* env entry RELAY_REDIS_URL from the chart's Secret or an existing one. */}}
{{- define "nostr-relay.redisUrlEnv" -}}
- name: RELAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.existingSecret }}
      name: {{ .Values.redis.existingSecret }}
      key: {{ required "redis.existingSecretKey is required with redis.existingSecret" .Values.redis.existingSecretKey }}
      {{- else }}
      name: {{ include "nostr-relay.secretName" . }}
      key: redis-url
      {{- end }}
{{- end -}}

{{/* env entry RELAY_DATABASE_URL from the chart's Secret or an existing one. */}}
{{- define "nostr-relay.databaseUrlEnv" -}}
- name: RELAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.database.existingSecret }}
      name: {{ .Values.database.existingSecret }}
      key: {{ required "database.existingSecretKey is required with database.existingSecret" .Values.database.existingSecretKey }}
      {{- else }}
      name: {{ include "nostr-relay.secretName" . }}
      key: database-url
      {{- end }}
{{- end -}}

{{/*
The relay's public WebSocket URL: gateway.publicUrl, else derived from the
first ingress host (wss:// when a TLS entry covers it), else empty.
*/}}
{{- define "nostr-relay.publicUrl" -}}
{{- $ing := .Values.gateway.ingress -}}
{{- if .Values.gateway.publicUrl -}}
{{- .Values.gateway.publicUrl -}}
{{- else if and $ing.enabled $ing.hosts -}}
{{- $host := first $ing.hosts -}}
{{- $scheme := "ws" -}}
{{- range $ing.tls -}}
{{- if has $host (.hosts | default list) -}}{{- $scheme = "wss" -}}{{- end -}}
{{- end -}}
{{- $path := ternary "" $ing.path (eq $ing.path "/") -}}
{{- printf "%s://%s%s" $scheme $host $path -}}
{{- end -}}
{{- end -}}

{{/*
RELAY_TRUST_FORWARDED of the gateway ("true" or "false"): gateway.trustForwarded,
or with "auto" whether the Ingress (which sets X-Forwarded-For) is enabled.
*/}}
{{- define "nostr-relay.trustForwarded" -}}
{{- $t := .Values.gateway.trustForwarded -}}
{{- if eq (toString $t) "auto" -}}
{{- ternary "true" "false" (.Values.gateway.ingress.enabled | default false) -}}
{{- else -}}
{{- ternary "true" "false" (eq (toString $t) "true") -}}
{{- end -}}
{{- end -}}

{{/*
Gateway terminationGracePeriodSeconds: the preStop sleep, then SIGTERM and
up to RELAY_DRAIN_SECS of draining, plus a margin.
*/}}
{{- define "nostr-relay.gatewayGracePeriod" -}}
{{- add (int .Values.gateway.preStopSleepSeconds) (int .Values.gateway.drainSeconds) (int .Values.gateway.terminationGraceMarginSeconds) -}}
{{- end -}}

{{/*
ConfigMap data shared by every component: bus, logging and OpenTelemetry.
Takes (dict "root" $ "serviceName" "...").
*/}}
{{- define "nostr-relay.commonEnv" -}}
{{- $v := .root.Values -}}
RELAY_BUS_PREFIX: {{ $v.bus.prefix | quote }}
RELAY_BUS_SHARDS: {{ $v.bus.shards | int64 | quote }}
RELAY_LOG_FORMAT: {{ $v.logging.format | quote }}
RUST_LOG: {{ $v.logging.level | quote }}
OTEL_SERVICE_NAME: {{ .serviceName | quote }}
{{- if $v.otel.endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $v.otel.endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $v.otel.protocol | quote }}
{{- end }}
OTEL_TRACES_SAMPLER: {{ $v.otel.sampler | quote }}
{{- if ne (toString $v.otel.samplerArg) "" }}
OTEL_TRACES_SAMPLER_ARG: {{ $v.otel.samplerArg | toString | quote }}
{{- end }}
{{- $attrs := list (printf "service.version=%s" (.root.Values.image.tag | default .root.Chart.AppVersion | toString)) (printf "k8s.namespace.name=%s" .root.Release.Namespace) }}
{{- if $v.otel.resourceAttributes }}
{{- $attrs = prepend $attrs $v.otel.resourceAttributes }}
{{- end }}
OTEL_RESOURCE_ATTRIBUTES: {{ join "," $attrs | quote }}
{{- end -}}

{{/* Checksum of the rendered ConfigMaps and Secret, to roll pods on change. */}}
{{- define "nostr-relay.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* Pod-level settings shared by every relay pod. */}}
{{- define "nostr-relay.podCommon" -}}
serviceAccountName: {{ include "nostr-relay.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/*
HorizontalPodAutoscaler (autoscaling/v2) of one component.
Takes (dict "root" $ "component" "gateway" "autoscaling" .Values.gateway.autoscaling).
*/}}
{{- define "nostr-relay.hpa" -}}
{{- $a := .autoscaling -}}
{{- if and (not $a.targetCPUUtilizationPercentage) (not $a.targetMemoryUtilizationPercentage) -}}
{{- fail (printf "%s autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" .component) -}}
{{- end -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "%s autoscaling: minReplicas (%d) is above maxReplicas (%d)" .component (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "nostr-relay.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "nostr-relay.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "nostr-relay.componentName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- if $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- end }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: {{ $a.scaleDownStabilizationSeconds }}
{{- end -}}

{{/*
Deployment of a worker: its HTTP server (/metrics, /healthz, /readyz) listens
on the container port "metrics"; the probes use it.
Takes (dict "root" $ "component" "ingest-worker" "values" .Values.ingestWorker).
*/}}
{{- define "nostr-relay.workerDeployment" -}}
{{- $root := .root -}}
{{- $w := .values -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "nostr-relay.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "nostr-relay.componentLabels" . | nindent 4 }}
spec:
  {{- if not $w.autoscaling.enabled }}
  replicas: {{ $w.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "nostr-relay.componentSelectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "nostr-relay.componentSelectorLabels" . | nindent 8 }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "nostr-relay.configChecksums" $root | nindent 8 }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "nostr-relay.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .component }}
          image: {{ include "nostr-relay.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - /usr/local/bin/{{ .component }}
          ports:
            - name: metrics
              containerPort: {{ $w.metricsPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "nostr-relay.componentName" . }}
          env:
            {{- include "nostr-relay.redisUrlEnv" $root | nindent 12 }}
            {{- include "nostr-relay.databaseUrlEnv" $root | nindent 12 }}
          {{- if $w.probes.enabled }}
          {{- $r := $w.probes.readiness }}
          {{- $l := $w.probes.liveness }}
          # Ready once the last heartbeat reached Redis with Postgres answering.
          readinessProbe:
            httpGet:
              path: /readyz
              port: metrics
            initialDelaySeconds: {{ $r.initialDelaySeconds | default 0 }}
            periodSeconds: {{ $r.periodSeconds }}
            timeoutSeconds: {{ $r.timeoutSeconds }}
            failureThreshold: {{ $r.failureThreshold }}
            successThreshold: {{ $r.successThreshold }}
          # Alive while the process answers HTTP (not tied to Redis or Postgres).
          livenessProbe:
            httpGet:
              path: /healthz
              port: metrics
            initialDelaySeconds: {{ $l.initialDelaySeconds | default 0 }}
            periodSeconds: {{ $l.periodSeconds }}
            timeoutSeconds: {{ $l.timeoutSeconds }}
            failureThreshold: {{ $l.failureThreshold }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
