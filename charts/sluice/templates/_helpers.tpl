{{/* The release's base name. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object; `component` is controlplane or agent. */}}
{{- define "sluice.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "agent"). */}}
{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Read access to everything the Kubernetes source watches, minus Namespaces (cluster-scoped). */}}
{{- define "sluice.readRules" -}}
- apiGroups: [""]
  resources: [services, pods]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [networking.istio.io]
  resources: [virtualservices, destinationrules, serviceentries, workloadentries, sidecars]
  verbs: [get, list, watch]
- apiGroups: [security.istio.io]
  resources: [authorizationpolicies, peerauthentications, requestauthentications]
  verbs: [get, list, watch]
{{- if .Values.controlPlane.writeStatus }}
- apiGroups: [networking.istio.io]
  resources: [virtualservices/status, destinationrules/status, serviceentries/status, workloadentries/status, sidecars/status]
  verbs: [patch, update]
- apiGroups: [security.istio.io]
  resources: [authorizationpolicies/status, peerauthentications/status, requestauthentications/status]
  verbs: [patch, update]
{{- end }}
{{- end -}}

{{/* The trust bundle's rules: ConfigMap istio-ca-root-cert, read and replaced by name. */}}
{{- define "sluice.bundleRules" -}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [istio-ca-root-cert]
  verbs: [get, list, watch, update]
{{- end }}
