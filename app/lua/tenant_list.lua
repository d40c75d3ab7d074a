--[[
  tenant_list: every tenant the engine knows of, for GET /gpu/tenants and the metrics.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] "usage" (optional): only the tenants of TENANT_QUOTAS and those with usage left
            (what app/waiting.py's fair order needs: any other tenant has no usage and the
            default weight, so it may be left out; there may be a tenant per queued request).
  Returns: a flat list tenant, GPUs held, usage (GPU-seconds, decayed as of now), queued, ...
  for the tenants of TENANT_QUOTAS and every tenant holding GPUs, with usage left or queued.
  Bounded: K_TENANTS by the live allocations, k_tusage() by the fleet (includes/tenants.lua),
  K_TQUEUED by the queue.
]]
-- @include prelude
local seen, out = {}, {}
local function add(t)
  if seen[t] then return end
  seen[t] = true
  local held, u = tenant_usage(t)
  out[#out + 1] = t
  out[#out + 1] = tostring(held)
  out[#out + 1] = fnum(u)
  out[#out + 1] = tostring(tenant_queued(t))
end
if TENANT_QUOTAS ~= '' then
  for t in pairs(cjson.decode(TENANT_QUOTAS)) do add(t) end
end
local usage_only = ARGV[A + 1] == 'usage'
if not usage_only then
  for _, t in ipairs(rcall('HKEYS', K_TENANTS)) do add(t) end
end
for _, t in ipairs(rcall('HKEYS', k_tusage())) do add(t) end
if not usage_only then
  for _, t in ipairs(rcall('HKEYS', K_TQUEUED)) do add(t) end
end
return out
