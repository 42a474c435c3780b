{{/*
The API calls of the operator, as RBAC rules. They must equal the list in operator/nnunet_distill_operator/rbac.py:
tests/ship/test_rbac.py renders the chart and compares, both ways, and tests/operator records every call the
running operator makes and compares them with these rules, both ways.
Namespaced resources go to a Role per watched namespace (or the ClusterRole when watching all namespaces);
the cluster-scoped CRD watch is needed only when watching all namespaces (kopf scans for the CRD then).
The operator creates each job's trainer identity (ServiceAccount, Role, RoleBinding); Kubernetes lets it grant
only what it holds, hence get/patch on distillationjobs/status.
*/}}
{{- define "nnunet-distill-operator.rules.namespaced" -}}
- apiGroups: ["distillation.nnunet.io"]
  resources: ["distillationjobs"]
  verbs: ["list", "watch", "delete"]
- apiGroups: ["distillation.nnunet.io"]
  resources: ["distillationjobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create"]
{{- end }}

{{- define "nnunet-distill-operator.rules.cluster" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
