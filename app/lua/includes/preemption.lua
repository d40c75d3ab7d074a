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

--[[
  Holds. A guarantee preemption keeps the node whose GPUs it frees for the queued request it
  was made for: the node is that request's reservation (K_RES, reserved_node) and k_holds()
  marks the reservation strong. The pass gives a held node to no other request, whatever its
  rank (no backfill, no spare GPUs), until the holder is granted or leaves the queue (dequeue
  drops both), or its node is forgotten. A holder whose victims have all ended and that still
  does not fit keeps the hold for HB_TIMEOUT more (the monitor's next report shows the memory a
  victim freed), then it is a plain reservation again (pass.lua, hold_lapsed).

    time 0   tenant A (guarantee 4, holds 0) queues R (2 GPUs); the fleet is full, B holds 6
             (guarantee 2): two of B's allocations turn preempting, node n is held for R
    time 10  one victim releases: its GPU is free, but held: C's higher-ranked request that
             would fit there is not placed on n
    time 30  the reaper ends the other at preempt_at: the same script's pass places R on n
]]
local function read_holds()
  local h = redis.call('HGETALL', k_holds())
  if #h == 0 then return nil, nil end
  local by_node, by_id = {}, {}
  for i = 1, #h, 2 do
    by_node[h[i]] = h[i + 1]
    by_id[h[i + 1]] = h[i]
  end
  return by_node, by_id
end

-- Hold node for queued request rid, whose preemption made `pending` victims.
local function hold_node(r, node, pending)
  local old = r.reserved
  if old ~= '' and old ~= node and redis.call('HGET', K_RES, old) == r.id then
    redis.call('HDEL', K_RES, old)
    redis.call('HDEL', k_holds(), old)
    bump_capacity()
  end
  redis.call('HSET', K_RES, node, r.id)
  redis.call('HSET', k_holds(), node, r.id)
  redis.call('ZREM', K_QUNRES, r.id)
  redis.call('HSET', k_req(r.id), 'reserved_node', node, 'preempt_pending', pending,
    'hold_until', '')
  r.reserved = node
  event('reserved', r.id, r.svc, {'node', node, 'reason', 'preemption'})
end

-- The holder's victims have all ended and their grace for the monitor passed: the hold lapses.
local function hold_lapsed(id)
  local f = redis.call('HMGET', k_req(id), 'preempt_pending', 'hold_until')
  return (tonumber(f[1]) or 0) <= 0 and NOW >= (tonumber(f[2]) or 0)
end

--[[
  Guarantee preemption (preemption.enabled). A queued exclusive request r of tenant T may
  preempt when:
    * T holds fewer than its guaranteed_gpus: held(T) + GPUs already coming to T through holds
      + r's GPUs <= guaranteed(T) (a guarantee is reclaimed, never exceeded by preemption);
    * r is eligible (dependencies done, not over T's max_gpus) and holds no node yet;
    * no node could give r its GPUs within the grace period: the k-th earliest time a
      qualifying GPU frees (now when free, the holder's lease end otherwise) is later than
      now + grace on every node r may use (nodes reserved by other requests left out).
  Victims: on each node, exclusive allocations of other tenants (status allocated) that hold
  qualifying GPUs, lowest priority first, then the most recently granted; one is taken only
  when its tenant keeps at least its guarantee after it (GPUs held, less those of its
  allocations already preempting, less the victims taken before it) and the GPUs taken stay
  within what r lacks on that node (never more than r needs). The node needing the fewest
  victims (then the fewest GPUs) wins. Victims turn preempting (reason guarantee,
  preempted_for r), and the node is held for r.
]]
local guarantee_for, guarantee_any = nil, false

-- Does any tenant have a guarantee? (cached per settings string: settings differ only
-- between deployments, and a library's locals outlive a call)
local function guarantees_exist()
  local key = TENANT_QUOTAS .. '#' .. TENANT_DEFAULT
  if guarantee_for ~= key then
    guarantee_for = key
    guarantee_any = tenant_quota('').guaranteed > 0
    if not guarantee_any and TENANT_QUOTAS ~= '' then
      for _, v in pairs(cjson.decode(TENANT_QUOTAS)) do
        if (tonumber(v[2]) or 0) > 0 then guarantee_any = true end
      end
    end
  end
  return guarantee_any
end

-- The live allocations once per evaluation: by id (lease end, node, GPUs, status, tenant,
-- priority, granted at) and, per tenant, the GPUs of its allocations already preempting.
local function live_view()
  local v = {by_id = {}, leaving = {}}
  local ls = redis.call('ZRANGE', K_LEASES, 0, -1, 'WITHSCORES')
  for i = 1, #ls, 2 do
    local id = ls[i]
    local f = redis.call('HMGET', k_req(id), 'status', 'tenant', 'priority', 'allocated_at',
      'sharing', 'gpu_ids', 'submitted_at')
    local n = 1
    if f[5] ~= 'shared' then n = #cjson.decode(f[6] or '[]') end
    local a = {id = id, ends = tonumber(ls[i + 1]) or NEVER, status = f[1], tenant = f[2] or '',
      priority = tonumber(f[3] or REC_DEFAULTS.priority) or 0, at = tonumber(f[4] or f[7]) or 0,
      shared = f[5] == 'shared', n = n}
    if a.ends > NEVER then a.ends = NEVER end
    v.by_id[id] = a
    if a.status == 'preempting' then
      v.leaving[a.tenant] = (v.leaving[a.tenant] or 0) + n
    end
  end
  return v
end

local function victim_order(x, y)
  if x.priority ~= y.priority then return x.priority < y.priority end
  if x.at ~= y.at then return x.at > y.at end
  return x.id < y.id
end

-- The preemption plan for r: {node, victims, gpus} or nil (and 'soon' when r could get GPUs
-- within the grace period without one).
local function preemption_plan(r, view)
  local horizon = NOW + PREEMPT_GRACE
  local best = nil
  local sizes = redis.call('ZRANGEBYSCORE', K_SIZES, r.k, '+inf')
  for _, node in ipairs(sizes) do
    local holder = redis.call('HGET', K_RES, node)
    if node_ok(r, node) and node_alive(node) and (not holder or holder == r.id) then
      local times, free_n, q_of = {}, 0, {}
      for _, idx in ipairs(node_indexes(node)) do
        local g = redis.call('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
          'memory_total_mb', 'excl', 'shared_n', 'name')
        if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and (tonumber(g[4]) or 0) >= r.minm
            and model_matches(r.pat, g[7]) then
          local excl = g[5] or ''
          if excl ~= '' then
            local a = view.by_id[excl]
            times[#times + 1] = a and a.ends or NEVER
            q_of[excl] = (q_of[excl] or 0) + 1
          elseif (tonumber(g[6]) or 0) > 0 then
            times[#times + 1] = NEVER
          else
            times[#times + 1] = NOW
            free_n = free_n + 1
          end
        end
      end
      if #times >= r.k then
        table.sort(times)
        if times[r.k] <= horizon then return nil, 'soon' end
        local need = r.k - free_n
        local cands = {}
        for id, q in pairs(q_of) do
          local a = view.by_id[id]
          if a and a.status == 'allocated' and not a.shared and a.tenant ~= '' and
              a.tenant ~= r.tenant then
            cands[#cands + 1] = {a = a, q = q}
          end
        end
        table.sort(cands, function(x, y) return victim_order(x.a, y.a) end)
        local taken, freed, total, victims = {}, 0, 0, {}
        for _, c in ipairs(cands) do
          if freed >= need then break end
          local a = c.a
          if total + a.n <= need then
            local t = a.tenant
            local left = tenant_held(t) - (view.leaving[t] or 0) - (taken[t] or 0) - a.n
            if left >= tenant_quota(t).guaranteed then
              taken[t] = (taken[t] or 0) + a.n
              freed, total = freed + c.q, total + a.n
              victims[#victims + 1] = a
            end
          end
        end
        if freed >= need and (best == nil or #victims < #best.victims or
            (#victims == #best.victims and total < best.gpus)) then
          best = {node = node, victims = victims, gpus = total}
        end
      end
    end
  end
  return best
end

-- GPUs already coming to tenant t through holds.
local function incoming(t, holds_by_node)
  local n = 0
  if holds_by_node then
    for _, id in pairs(holds_by_node) do
      local f = redis.call('HMGET', k_req(id), 'tenant', 'required_gpus', 'sharing')
      if f[1] == t then
        n = n + (f[3] == 'shared' and 1 or (tonumber(f[2] or REC_DEFAULTS.required_gpus) or 0))
      end
    end
  end
  return n
end

-- May r preempt at all (before any look at the fleet)?
local function may_preempt(r, holds_by_node, holds_by_id)
  if not r or r.status ~= 'queued' or r.tenant == '' or r.sharing == 'shared' then return false end
  if holds_by_id and holds_by_id[r.id] then return false end
  local g = tenant_quota(r.tenant).guaranteed
  if g <= 0 or tenant_held(r.tenant) + incoming(r.tenant, holds_by_node) + r.k > g then
    return false
  end
  return deps_done(r) and not over_quota(r)
end

-- Preempt for r now if it may and a plan exists; returns the victims' count (0 = none).
local function preempt_for(r, view)
  local plan = preemption_plan(r, view)
  if not plan then return 0 end
  hold_node(r, plan.node, #plan.victims)
  for _, a in ipairs(plan.victims) do
    preempt_alloc(a.id, PREEMPT_GRACE, 'guarantee', 'system', r.id)
    a.status = 'preempting'
    view.leaving[a.tenant] = (view.leaving[a.tenant] or 0) + a.n
  end
  return #plan.victims
end

--[[
  After a pass: the requests that may preempt get their chance. new_id (allocate): only it.
  force (the scheduler's periodic pass): each tenant below its guarantee with something queued,
  its first request in its own queue order that may preempt, at most MAX_PREEMPT_EVALS
  requests per pass (each costs a read of every live allocation, once per call, and of the
  GPUs of the nodes it may use). Returns how many allocations were preempted.
]]
local MAX_PREEMPT_EVALS = 4
local function preempt_for_guarantees(new_id, force)
  if PREEMPT ~= '1' or not (new_id or force) or not guarantees_exist() then return 0 end
  local holds_by_node, holds_by_id = read_holds()
  local view, done, evals = nil, 0, 0
  local function try(r)
    if not may_preempt(r, holds_by_node, holds_by_id) then return end
    evals = evals + 1
    view = view or live_view()
    local n = preempt_for(r, view)
    if n > 0 then
      done = done + n
      holds_by_node, holds_by_id = read_holds()
    end
  end
  if new_id then
    try(load_req(new_id))
    return done
  end
  local tq = redis.call('HGETALL', K_TQUEUED)
  for i = 1, #tq, 2 do
    if evals >= MAX_PREEMPT_EVALS then break end
    local t = tq[i]
    local g = tenant_quota(t).guaranteed
    if g > 0 and tenant_held(t) < g then
      for _, id in ipairs(redis.call('ZRANGE', k_tqueue(t), 0, 49)) do
        local r = load_req(id)
        if may_preempt(r, holds_by_node, holds_by_id) then
          try(r)
          break
        end
      end
    end
  end
  return done
end
