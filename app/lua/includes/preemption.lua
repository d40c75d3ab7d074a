--[[
  preemption: ending a live allocation early with notice. A preempted allocation turns
  `preempting` with preempt_at = now + grace (the holder gets a `preempting` event and webhook),
  and ends as `preempted` when its holder releases it or at preempt_at (the reaper), whichever
  comes first; its GPUs then go back like any other ending.
  Guarantees: a preempting allocation's lease never runs past preempt_at (the mark and every
  renewal cap expires_at there, and the leases index carries it, so the reaper ends it on
  time); one mark is one event and one webhook (always sent when the record has a
  webhook_url); an allocation is marked at most once (a second mark keeps the first deadline).
]]

-- A lease end capped at preempt_at: (expires_at as stored, the leases index score).
local function capped_lease(expires, preempt_at)
  local e = tonumber(expires)
  if e == nil or e > preempt_at then
    local s = ftime(preempt_at)
    return s, s
  end
  return expires, expires
end

--[[
  Mark live allocation id preempting: preempt_at = NOW + grace (grace <= 0 ends it at once).
  reason: why (drain | guarantee); by: who (a principal, or system); for_id: the queued request
  it is preempted for ('' = none). Returns true when it was marked now, false when it was not
  live or was already preempting (its first deadline stands).
]]
local function preempt_alloc(id, grace, reason, by, for_id)
  local rk = k_req(id)
  local f = redis.call('HMGET', rk, 'status', 'expires_at', 'service_name', 'webhook_url', 'node',
    'gpu_ids', 'tenant')
  if f[1] ~= 'allocated' then return false end
  if grace < 0 then grace = 0 end
  local at = NOW + grace
  local at_s = ftime(at)
  local expires, score = capped_lease(f[2], at)
  redis.call('HSET', rk, 'status', 'preempting', 'preempt_at', at_s, 'expires_at', expires,
    'reason', reason, 'preempted_for', for_id or '')
  redis.call('ZADD', K_LEASES, score, id)
  notify(id, 'preempting')
  local extra = {'node', f[5] or '', 'gpu_ids', f[6] or '[]', 'preempt_at', at_s,
    'reason', reason, 'by', by or ''}
  if for_id and for_id ~= '' then
    extra[#extra + 1] = 'for'
    extra[#extra + 1] = for_id
  end
  local evid = event('preempting', id, f[3], extra)
  -- gpu_orchestrator_preemptions_total{tenant}: the tenant (its service before tenants), under
  -- the same bounded label set as the services (stats.lua, svc_label)
  local tenant = f[7] or ''
  stat('preempt|' .. svc_label(tenant ~= '' and tenant or f[3]))
  outbox('preempting', id, evid, f[4], nil, true, {expires_at = expires, preempt_at = at_s})
  if grace <= 0 then finish_alloc(id, 'preempted') end
  return true
end

-- How a live allocation ends now that its lease index says it is due: a preempting one whose
-- lease end is its preempt_at is preempted; any other (its own lease ran out first) expired.
local function due_status(id)
  local f = redis.call('HMGET', k_req(id), 'status', 'expires_at', 'preempt_at')
  if f[1] == 'preempting' and (tonumber(f[2]) or 0) >= (tonumber(f[3]) or math.huge) then
    return 'preempted'
  end
  return 'expired'
end
