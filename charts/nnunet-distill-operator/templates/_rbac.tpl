{{/*
The API calls of the operator and of the trainer pods, as RBAC rules. They must equal the lists in
operator/nnunet_distill_operator/rbac.py: tests/ship/test_rbac.py renders the chart and compares, both ways.
Namespaced resources go to a Role per watched namespace (or the ClusterRole when watching all namespaces);
cluster-scoped ones always need a ClusterRole.
*/}}
{{- define "nnunet-distill-operator.rules.namespaced" -}}
- apiGroups: ["distillation.nnunet.io"]
  resources: ["distillationjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["distillation.nnunet.io"]
  resources: ["distillationjobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "nnunet-distill-operator.rules.cluster" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "nnunet-distill-operator.rules.trainer" -}}
- apiGroups: ["distillation.nnunet.io"]
  resources: ["distillationjobs/status"]
  verbs: ["get", "patch"]
{{- end }}
