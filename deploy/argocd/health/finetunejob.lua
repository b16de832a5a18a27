-- Argo CD health check for kubetune.io/v1alpha1 FineTuneJob.
--
-- Healthy: the current spec generation published (or reused) a version. Progressing: the operator
-- has not seen this generation yet, or the run is pending, queued or training. Suspended:
-- spec.runPolicy.suspend. Degraded: the spec is invalid, the run failed (including failed gates),
-- or it is stalled (image pull failure, unschedulable pods). The message says what to look at.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind and c.status == "True" then
      return c
    end
  end
  return nil
end

local function with_reason(status, fallback)
  local text = status.message
  if text == nil or text == "" then
    text = fallback
  end
  if status.reason ~= nil and status.reason ~= "" then
    return status.reason .. ": " .. text
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up this FineTuneJob"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end

local invalid = condition(status, "Invalid")
if invalid ~= nil then
  hs.status = "Degraded"
  hs.message = "Invalid spec: " .. (invalid.message or "")
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  local version = status.version
  if version ~= nil and version.name ~= nil then
    if version.reused then
      hs.message = "Reused " .. version.name .. " (same inputs digest: nothing retrained)"
    else
      hs.message = "Published " .. version.name
    end
    if status.gates ~= nil and status.gates.summary ~= nil and status.gates.summary ~= "" then
      hs.message = hs.message .. ", gates " .. status.gates.summary
    end
  else
    hs.message = with_reason(status, "Succeeded")
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = with_reason(status, "The run failed")
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_reason(status, "Suspended (spec.runPolicy.suspend)")
  return hs
end

local stalled = condition(status, "Stalled")
if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end

hs.status = "Progressing"
if phase == "Queued" then
  hs.message = with_reason(status, "Queued: waiting for admission")
  return hs
end
local progress = status.progress
if phase == "Running" and progress ~= nil then
  local parts = {}
  local stage = status.stage or progress.stage
  if stage ~= nil then
    table.insert(parts, stage)
  end
  if progress.summary ~= nil and progress.summary ~= "" then
    table.insert(parts, progress.summary)
  end
  if progress.loss ~= nil then
    table.insert(parts, string.format("loss %.4g", progress.loss))
  end
  if progress.etaSeconds ~= nil then
    table.insert(parts, string.format("ETA %dm", math.floor(progress.etaSeconds / 60 + 0.5)))
  end
  hs.message = table.concat(parts, ", ")
  return hs
end
hs.message = with_reason(status, phase)
return hs
