-- Argo CD health check for kubetune.io/v1alpha1 ModelVersion (an immutable catalogue record; it has
-- no status). Healthy: the version passed its gates (or has none). Degraded: it failed a gate, so it
-- is published but not promotable; the message names the gates that failed.
local hs = {}
local spec = obj.spec
if spec == nil then
  hs.status = "Degraded"
  hs.message = "ModelVersion without a spec"
  return hs
end
local label = (spec.model or "?") .. " " .. (spec.version or "?")
local gates = spec.gates
if gates == nil or gates.passed == nil or gates.passed then
  hs.status = "Healthy"
  hs.message = label
  if spec.keyMetric ~= nil and spec.keyMetric ~= "" then
    hs.message = hs.message .. " (" .. spec.keyMetric .. ")"
  end
  return hs
end
hs.status = "Degraded"
local failed = {}
if gates.results ~= nil then
  for _, r in ipairs(gates.results) do
    if not r.passed then
      local text = r.metric
      if r.message ~= nil and r.message ~= "" then
        text = text .. ": " .. r.message
      end
      table.insert(failed, text)
    end
  end
end
hs.message = label .. " failed its gates (not promotable)"
if #failed > 0 then
  hs.message = hs.message .. ": " .. table.concat(failed, "; ")
end
return hs
