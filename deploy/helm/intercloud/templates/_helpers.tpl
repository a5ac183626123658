{{/* Names and labels. */}}
{{- define "intercloud.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "intercloud.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "intercloud.selectorLabels" -}}
app.kubernetes.io/name: {{ include "intercloud.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.role }}
{{- end }}

{{- define "intercloud.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "intercloud.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "intercloud.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "intercloud.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "intercloud.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "intercloud.tlsSecret" -}}
{{- default (printf "%s-tls" (include "intercloud.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "intercloud.clusterSecret" -}}
{{- default (printf "%s-cluster-tls" (include "intercloud.fullname" .)) .Values.cluster.secretName }}
{{- end }}

{{- define "intercloud.adminSecret" -}}
{{- default (printf "%s-admin" (include "intercloud.fullname" .)) .Values.admin.existingSecret }}
{{- end }}

{{/* The headless Service of the cloud members: the one name that resolves to every member. */}}
{{- define "intercloud.peersService" -}}
{{- printf "%s-peers" (include "intercloud.fullname" .) }}
{{- end }}

{{/* listenAddress as the host of HOST:PORT and URLs ([::] for IPv6), and the loopback address probes use. */}}
{{- define "intercloud.listenHost" -}}
{{- if contains ":" .Values.listenAddress }}{{ printf "[%s]" .Values.listenAddress }}{{ else }}{{ .Values.listenAddress }}{{ end }}
{{- end }}

{{- define "intercloud.loopback" -}}
{{- if contains ":" .Values.listenAddress }}[::1]{{ else }}127.0.0.1{{ end }}
{{- end }}

{{/* Cloud: the pod names of the StatefulSet, which are the members' node ids, as a list. */}}
{{- define "intercloud.podNames" -}}
{{- $names := list }}
{{- range $i := until (int .Values.replicas) }}
{{- $names = append $names (printf "%s-%d" (include "intercloud.fullname" $) $i) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Input checks that helm lint/template report before anything reaches a cluster. */}}
{{- define "intercloud.validate" -}}
{{- if not (has .Values.role (list "cloud" "onprem")) }}
{{- fail (printf "values role: %q is not a role; use role: cloud or role: onprem" (toString .Values.role)) }}
{{- end }}
{{- if lt (int .Values.replicas) 1 }}
{{- fail "values replicas: must be at least 1" }}
{{- end }}
{{- if lt (int .Values.drainTimeoutSeconds) 1 }}
{{- fail "values drainTimeoutSeconds: must be at least 1 (gateway.drain_timeout in seconds)" }}
{{- end }}
{{- if lt (int .Values.terminationGraceMarginSeconds) 1 }}
{{- fail "values terminationGraceMarginSeconds: must be at least 1, or the kubelet kills the gateway at the end of its drain" }}
{{- end }}
{{- range $key := list "role" "node_id" "admin" "admin_token" "drain_timeout" }}
{{- if hasKey ($.Values.config.gateway | default dict) $key }}
{{- fail (printf "values config.gateway.%s: set by the chart (see docs/kubernetes.md §3); remove it from config.gateway" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "cert" "key" "ca" "insecure" "crl" }}
{{- if hasKey ($.Values.config.tls | default dict) $key }}
{{- fail (printf "values config.tls.%s: set by the chart from the Secret tls.secretName; remove it from config.tls" $key) }}
{{- end }}
{{- end }}
{{- if hasKey (.Values.config.tunnel | default dict) "listen" }}
{{- fail "values config.tunnel.listen: set by the chart (ports.tunnel, tunnelPath); remove it from config.tunnel" }}
{{- end }}
{{- range $key := list "listen" "peers" "ca" "cert" "key" "peer_names" "crl" }}
{{- if hasKey ($.Values.config.cluster | default dict) $key }}
{{- fail (printf "values config.cluster.%s: set by the chart (the headless Service and cluster.secretName); remove it from config.cluster" $key) }}
{{- end }}
{{- end }}
{{- if eq .Values.role "onprem" }}
{{- if not (.Values.config.tunnel | default dict).connect }}
{{- fail "values config.tunnel.connect: required for role: onprem: the cloud's tunnel URL(s), e.g. [\"wss://tunnel.example.com/intercloud\"]" }}
{{- end }}
{{- if .Values.config.tenant }}
{{- fail "values config.tenant: [[tenant]] tables are for role: cloud only" }}
{{- end }}
{{- if .Values.config.cluster }}
{{- fail "values config.cluster: [cluster] is for role: cloud only" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "values tls.certManager.issuerRef.name: required with tls.certManager.enabled (the cert-manager Issuer or ClusterIssuer)" }}
{{- end }}
{{- if and (eq .Values.role "cloud") .Values.cluster.certManager.enabled (not .Values.cluster.certManager.issuerRef.name) }}
{{- fail "values cluster.certManager.issuerRef.name: required with cluster.certManager.enabled (an Issuer of the peer-link CA, apart from the tunnel CA)" }}
{{- end }}
{{- range $i, $svc := .Values.config.service }}
{{- if not (kindIs "map" $svc) }}
{{- fail (printf "values config.service[%d]: must be a table such as {name: db, accept: \"tcp://0.0.0.0:5432\"}" $i) }}
{{- end }}
{{- if and $svc.accept (not (regexMatch "^tcp://.*:[0-9]+$" (toString $svc.accept))) }}
{{- fail (printf "values config.service[%d].accept: %q is not tcp://HOST:PORT" $i (toString $svc.accept)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The accept services with their ports: a list of {name, port} for the Service and the pod. */}}
{{- define "intercloud.acceptPorts" -}}
{{- $ports := list }}
{{- range $i, $svc := .Values.config.service }}
{{- if $svc.accept }}
{{- $port := regexFind "[0-9]+$" (toString $svc.accept) | atoi }}
{{- $pname := printf "s%d-%s" $i (regexReplaceAll "[^a-z0-9-]" (lower (toString $svc.name)) "-") | trunc 15 | trimSuffix "-" }}
{{- $ports = append $ports (dict "name" $pname "port" $port) }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/*
A TOML value: string, boolean, number (whole numbers as integers: values files give floats), or an
array of those. Helm's toToml writes 2 as 2.0, which integer keys would refuse.
*/}}
{{- define "intercloud.tomlValue" -}}
{{- $v := .value }}
{{- if kindIs "string" $v }}{{ toJson $v }}
{{- else if kindIs "bool" $v }}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "intercloud.tomlValue" (dict "value" $e "key" $.key) }}{{ end }}]
{{- else }}{{ fail (printf "values config: %s: a %s cannot be written to the TOML file here; use a string, number, boolean or array" .key (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* The key = value lines of one table. */}}
{{- define "intercloud.tomlTable" -}}
{{- range $k := keys .table | sortAlpha }}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $k) }}{{ fail (printf "values config: key %q of %s is not a TOML bare key" $k $.name) }}{{ end }}
{{ $k }} = {{ include "intercloud.tomlValue" (dict "value" (get $.table $k) "key" (printf "%s.%s" $.name $k)) }}
{{- end }}
{{- end }}

{{/*
The gateway's TOML file. @POD_NAME@ and @ADMIN_TOKEN@ are replaced at start by the init container
(templates/_pod.tpl), which writes the result into an emptyDir and runs `intercloud check` on it.
*/}}
{{- define "intercloud.toml" -}}
{{- $cfg := .Values.config }}
{{- $gateway := merge (dict
      "role" .Values.role
      "admin" (printf "%s:%d" (include "intercloud.listenHost" .) (int .Values.ports.admin))
      "admin_token" "@ADMIN_TOKEN@"
      "drain_timeout" (printf "%ds" (int .Values.drainTimeoutSeconds))) (deepCopy ($cfg.gateway | default dict)) }}
{{- if or (eq .Values.role "cloud") .Values.onprem.nodeIdFromPodName }}
{{- $_ := set $gateway "node_id" "@POD_NAME@" }}
{{- end }}
{{- $tls := merge (dict
      "cert" "/etc/intercloud/tls/tls.crt"
      "key" "/etc/intercloud/tls/tls.key"
      "ca" "/etc/intercloud/tls-ca/ca.crt") (deepCopy ($cfg.tls | default dict)) }}
{{- if .Values.tls.crl.secretName }}
{{- $_ := set $tls "crl" "/etc/intercloud/crl/crl.pem" }}
{{- end }}
{{- $tunnel := deepCopy ($cfg.tunnel | default dict) }}
{{- if eq .Values.role "cloud" }}
{{- $_ := set $tunnel "listen" (printf "wss://%s:%d%s" (include "intercloud.listenHost" .) (int .Values.ports.tunnel) .Values.tunnelPath) }}
{{- end -}}
# intercloud gateway configuration, rendered by the Helm chart from its values (docs/kubernetes.md).
# @POD_NAME@ / @ADMIN_TOKEN@ are filled in at pod start; the result is checked with `intercloud check`.
[gateway]
{{- include "intercloud.tomlTable" (dict "table" $gateway "name" "gateway") }}

[tls]
{{- include "intercloud.tomlTable" (dict "table" $tls "name" "tls") }}

[tunnel]
{{- include "intercloud.tomlTable" (dict "table" $tunnel "name" "tunnel") }}
{{- if eq .Values.role "cloud" }}
{{- $peers := printf "wss://%s.%s.svc.%s:%d%s" (include "intercloud.peersService" .) .Release.Namespace .Values.clusterDomain (int .Values.ports.cluster) .Values.clusterPath }}
{{- $cluster := merge (dict
      "listen" (printf "wss://%s:%d%s" (include "intercloud.listenHost" .) (int .Values.ports.cluster) .Values.clusterPath)
      "peers" (list $peers)
      "ca" "/etc/intercloud/cluster-tls/ca.crt"
      "cert" "/etc/intercloud/cluster-tls/tls.crt"
      "key" "/etc/intercloud/cluster-tls/tls.key"
      "peer_names" (include "intercloud.podNames" . | fromJsonArray)) (deepCopy ($cfg.cluster | default dict)) }}
{{- if .Values.cluster.crl.secretName }}
{{- $_ := set $cluster "crl" "/etc/intercloud/cluster-crl/crl.pem" }}
{{- end }}

[cluster]
{{- include "intercloud.tomlTable" (dict "table" $cluster "name" "cluster") }}
{{- range $i, $t := $cfg.tenant }}

[[tenant]]
{{- include "intercloud.tomlTable" (dict "table" $t "name" (printf "tenant[%d]" $i)) }}
{{- end }}
{{- end }}
{{- range $i, $s := $cfg.service }}

[[service]]
{{- include "intercloud.tomlTable" (dict "table" $s "name" (printf "service[%d]" $i)) }}
{{- end }}
{{- end }}

{{/* The securityContext of both containers: the Pod Security Standard "restricted". */}}
{{- define "intercloud.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The mounts of both containers (the init step reads what the gateway reads). */}}
{{- define "intercloud.volumeMounts" -}}
- {name: template, mountPath: /etc/intercloud/template, readOnly: true}
- {name: config, mountPath: /run/intercloud}
- {name: tmp, mountPath: /tmp}
- {name: admin-token, mountPath: /etc/intercloud/admin, readOnly: true}
- {name: tls, mountPath: /etc/intercloud/tls, readOnly: true}
- {name: tls-ca, mountPath: /etc/intercloud/tls-ca, readOnly: true}
{{- if eq .Values.role "cloud" }}
- {name: cluster-tls, mountPath: /etc/intercloud/cluster-tls, readOnly: true}
{{- end }}
{{- if .Values.tls.crl.secretName }}
- {name: crl, mountPath: /etc/intercloud/crl, readOnly: true}
{{- end }}
{{- if and (eq .Values.role "cloud") .Values.cluster.crl.secretName }}
- {name: cluster-crl, mountPath: /etc/intercloud/cluster-crl, readOnly: true}
{{- end }}
{{- end }}
