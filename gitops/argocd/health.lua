-- Argo CD health check for nnunet-distill DistillationJobs.
--
-- Install it as `resource.customizations.health.<group>_DistillationJob` in argocd-cm (see
-- gitops/argocd/argocd-cm-patch.yaml and README.md). Argo CD evaluates it with gopher-lua (Lua 5.1) and
-- passes the live object as `obj`.
--
-- The operator reports both a phase and the kstatus conditions (Ready / Reconciling / Stalled) that Flux reads.
-- Stalled and Failed win over everything: a job that can no longer make progress must show Degraded even while
-- a stale phase says otherwise. A spec change the operator has not observed yet is Progressing, so Argo CD does
-- not report the old status as the outcome of the new spec.

local hs = {}

local function condition(name)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == name then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local function progress_text()
  local p = obj.status and obj.status.progress
  if p == nil or p.epoch == nil or p.totalEpochs == nil then
    return ""
  end
  return " (epoch " .. tostring(p.epoch) .. "/" .. tostring(p.totalEpochs) .. ")"
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "DistillationJob is being deleted"
  return hs
end

if obj.status == nil then
  if obj.spec ~= nil and obj.spec.suspend == true then
    hs.status = "Suspended"
    hs.message = "DistillationJob is suspended (spec.suspend=true)"
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the nnunet-distill operator to report status"
  return hs
end

local phase = obj.status.phase
local ready = condition("Ready")
local stalled = condition("Stalled")
local reconciling = condition("Reconciling")

if phase == "Failed" or is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, describe(ready, "DistillationJob failed"))
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if phase == "Suspended" or (obj.spec ~= nil and obj.spec.suspend == true and phase ~= "Succeeded") then
  hs.status = "Suspended"
  local suspended = condition("Suspended")
  if not is_true(suspended) then
    suspended = nil
  end
  hs.message = describe(suspended, "DistillationJob is suspended (spec.suspend=true)")
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  local artifacts = obj.status.artifacts
  if artifacts ~= nil and artifacts.uri ~= nil then
    hs.message = "Student published to " .. artifacts.uri
  else
    hs.message = describe(ready, "DistillationJob succeeded")
  end
  return hs
end

hs.status = "Progressing"
hs.message = (phase or "Pending") .. ": " .. describe(reconciling, describe(ready, "in progress")) .. progress_text()
return hs
