--[[
  own_tenants: the tenants one owner's live and queued requests count against, for GET
  /gpu/tenants of a non-admin (tenants.key: service_name), without reading the queue.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] owner: the principal
  Returns: the tenant names (each once, none empty), in no order.
  Cost: O(live allocations) (at most as many as GPUs) plus the owner's own tenants; the queue
  is read only until the first write of this library load rebuilds k_qotenants
  (includes/call.lua: the other release of a rolling upgrade may have queued and dequeued
  requests without it, leaving counts that add up to K_QOWNERS under the wrong tenants), or
  while it does not add up to the owner's K_QOWNERS field.
]]
-- @include prelude
local owner = ARGV[A + 1]
local seen, out = {}, {}
local function add(t)
  if t and t ~= '' and not seen[t] then
    seen[t] = true
    out[#out + 1] = t
  end
end
for _, id in ipairs(rcall('ZRANGE', K_LEASES, 0, -1)) do
  local f = rcall('HMGET', k_req(id), 'owner', 'tenant')
  if f[1] == owner then add(f[2]) end
end
local queued = tonumber(rcall('HGET', K_QOWNERS, 'o:' .. owner) or '0') or 0
if queued > 0 then
  local h = rcall('HGETALL', k_qotenants(owner))
  local sum = 0
  for i = 2, #h, 2 do sum = sum + (tonumber(h[i]) or 0) end
  if sum == queued and upgraded[P] then
    for i = 1, #h, 2 do add(h[i]) end
  else
    for _, id in ipairs(rcall('ZRANGE', K_QUEUE, 0, -1)) do
      local f = rcall('HMGET', k_req(id), 'owner', 'tenant')
      if f[1] == owner then add(f[2]) end
    end
  end
end
return out
