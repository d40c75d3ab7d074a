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
  local f = rcall('HMGET', rk, 'status', 'expires_at', 'service_name', 'webhook_url', 'node',
    'gpu_ids', 'tenant')
  if f[1] ~= 'allocated' then return false end
  if grace < 0 then grace = 0 end
  local at = NOW + grace
  local at_s = ftime(at)
  local expires, score = capped_lease(f[2], at)
  rcall('HSET', rk, 'status', 'preempting', 'preempt_at', at_s, 'expires_at', expires,
    'reason', reason, 'preempted_for', for_id or '')
  rcall('ZADD', K_LEASES, score, id)
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
  local f = rcall('HMGET', k_req(id), 'status', 'expires_at', 'preempt_at')
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
  local h = rcall('HGETALL', k_holds())
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
  if old ~= '' and old ~= node and rcall('HGET', K_RES, old) == r.id then
    rcall('HDEL', K_RES, old)
    rcall('HDEL', k_holds(), old)
    bump_capacity()
  end
  rcall('HSET', K_RES, node, r.id)
  rcall('HSET', k_holds(), node, r.id)
  rcall('ZREM', K_QUNRES, r.id)
  rcall('HSET', k_req(r.id), 'reserved_node', node, 'preempt_pending', pending,
    'hold_until', '')
  r.reserved = node
  event('reserved', r.id, r.svc, {'node', node, 'reason', 'preemption'})
end

-- The holder's victims have all ended and their grace for the monitor passed: the hold lapses.
local function hold_lapsed(id)
  local f = rcall('HMGET', k_req(id), 'preempt_pending', 'hold_until')
  return (tonumber(f[1]) or 0) <= 0 and NOW >= (tonumber(f[2]) or 0)
end

--[[
  Guarantee preemption (preemption.enabled). A queued request r of tenant T, exclusive or
  shared, may preempt when:
    * T holds fewer than its guaranteed_gpus: held(T) + GPUs already coming to T through holds
      + r's GPUs (a shared request counts one) <= guaranteed(T) (a guarantee is reclaimed,
      never exceeded by preemption);
    * r is eligible (dependencies done, not over T's max_gpus) and holds no node yet;
    * r could not get its GPUs within the grace period without one (nodes reserved by other
      requests left out):
        exclusive r: on every node r may use, the k-th earliest time a qualifying GPU frees
          (now when free; an exclusive holder's lease end; a GPU with shared holders when the
          last of them ends) is later than now + grace;
        shared r: on no qualifying GPU is the room (total - max(reserved, used)) plus the
          reservations of the shared holders whose leases end by now + grace enough for its
          min_memory_mb, and no GPU's exclusive holder ends by then.
  Victims are live allocations (status allocated) of other tenants; one is taken only when its
  tenant keeps at least its guarantee after it (GPUs held, a shared allocation counting one,
  less those of its allocations already preempting, less the victims taken before it).
    exclusive r, per node: the units that free GPUs are exclusive allocations and GPUs with
      shared holders (all of them go, or none: a GPU is free only when its last holder ends);
      lowest priority first, then the most recently granted (a GPU of shared holders ranks by
      its most protected holder: highest priority, earliest grant); a unit is taken only while
      the GPUs it frees keep the GPUs taken within what r lacks on that node.
    shared r, per GPU: either its one exclusive holder when that holds this one GPU only, or
      shared holders of it, lowest priority first, then the most recently granted, until the
      room plus what they reserved is enough for r: never more than the one GPU r needs.
  The plan with the fewest victims wins, then the fewest GPUs, then the lowest priority among
  its victims (then the first node in size order). Victims turn preempting (reason
  guarantee, preempted_for r), and the node is held for r.
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
-- priority, granted at, memory reserved), per GPU ("node|index") its shared holders, and, per
-- tenant, the GPUs of its allocations already preempting.
local function live_view()
  local v = {by_id = {}, leaving = {}, shared = {}}
  local ls = rcall('ZRANGE', K_LEASES, 0, -1, 'WITHSCORES')
  for i = 1, #ls, 2 do
    local id = ls[i]
    local f = rcall('HMGET', k_req(id), 'status', 'tenant', 'priority', 'allocated_at',
      'sharing', 'gpu_ids', 'node', 'min_memory_mb', 'submitted_at')
    local gpus = cjson.decode(f[6] or '[]')
    local shared = f[5] == 'shared'
    local n = shared and 1 or #gpus
    -- granted at submission: no allocated_at stored (grants.lua), it is submitted_at
    local a = {id = id, ends = tonumber(ls[i + 1]) or NEVER, status = f[1], tenant = f[2] or '',
      priority = tonumber(f[3] or REC_DEFAULTS.priority) or 0, at = tonumber(f[4] or f[9]) or 0,
      shared = shared, n = n, mb = tonumber(f[8] or '0') or 0}
    if a.ends > NEVER then a.ends = NEVER end
    v.by_id[id] = a
    if shared and gpus[1] then
      local g = (f[7] or '') .. '|' .. string.format('%d', gpus[1])
      local l = v.shared[g]
      if not l then l = {}; v.shared[g] = l end
      l[#l + 1] = a
    end
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

-- May live allocation a be preempted for r at all? (its tenant's guarantee is checked apart)
local function victim_ok(a, r)
  return a ~= nil and a.status == 'allocated' and a.tenant ~= '' and a.tenant ~= r.tenant
end

-- Can the allocations `as` all go with every tenant keeping its guarantee? taken: what this
-- plan already takes per tenant (a shared allocation counts one); updated when they can.
local function keeps_guarantees(as, view, taken)
  local add = {}
  for _, a in ipairs(as) do add[a.tenant] = (add[a.tenant] or 0) + a.n end
  for t, n in pairs(add) do
    local left = tenant_held(t) - (view.leaving[t] or 0) - (taken[t] or 0) - n
    if left < tenant_quota(t).guaranteed then return false end
  end
  for t, n in pairs(add) do taken[t] = (taken[t] or 0) + n end
  return true
end

-- Is plan x better than plan y (fewest victims, then GPUs, then the lowest top priority)?
local function better_plan(x, y)
  if y == nil then return true end
  if #x.victims ~= #y.victims then return #x.victims < #y.victims end
  if x.gpus ~= y.gpus then return x.gpus < y.gpus end
  return x.top < y.top
end

local function plan_of(node, victims, gpus)
  local top = -math.huge
  for _, a in ipairs(victims) do
    if a.priority > top then top = a.priority end
  end
  return {node = node, victims = victims, gpus = gpus, top = top}
end

-- One node's plan for an exclusive request r: plan or nil, and 'soon' when r could get its
-- GPUs there within the grace period without one.
local function exclusive_node_plan(r, node, view, horizon)
  local times, free_n, soon_n, q_of, groups = {}, 0, 0, {}, {}
  for _, idx in ipairs(node_indexes(node)) do
    local g = rcall('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
      'memory_total_mb', 'excl', 'shared_n', 'name')
    if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and (tonumber(g[4]) or 0) >= r.minm
        and model_matches(r.pat, g[7]) then
      local excl = g[5] or ''
      local t = NOW
      if excl ~= '' then
        local a = view.by_id[excl]
        t = a and a.ends or NEVER
        q_of[excl] = (q_of[excl] or 0) + 1
      elseif (tonumber(g[6]) or 0) > 0 then
        -- free when its last shared holder ends (a holder the view lacks: never)
        local hs = view.shared[node .. '|' .. idx] or {}
        t = #hs > 0 and NOW or NEVER
        for _, a in ipairs(hs) do
          if a.ends > t then t = a.ends end
        end
        if t > horizon then groups[#groups + 1] = hs end
      else
        free_n = free_n + 1
      end
      times[#times + 1] = t
      -- a GPU that frees by the horizon anyway (a lease ending, a holder already preempting)
      -- is not taken again: it lessens what r lacks
      if t > NOW and t <= horizon then soon_n = soon_n + 1 end
    end
  end
  if #times < r.k then return nil end
  table.sort(times)
  if times[r.k] <= horizon then return nil, 'soon' end
  local need = r.k - free_n - soon_n
  -- units: {victims, gpus they take (counted against need), qualifying GPUs they free,
  -- priority, at, id} in victim order
  local units = {}
  for id, q in pairs(q_of) do
    local a = view.by_id[id]
    if victim_ok(a, r) and a.ends > horizon then
      units[#units + 1] = {victims = {a}, gpus = a.n, q = q, priority = a.priority, at = a.at,
        id = id}
    end
  end
  for _, hs in ipairs(groups) do
    local vs, ok, pr, at = {}, true, -math.huge, math.huge
    for _, a in ipairs(hs) do
      if a.ends > horizon then -- one leaving by then (preempting already, or its lease) stays
        if not victim_ok(a, r) then ok = false; break end
        vs[#vs + 1] = a
        if a.priority > pr then pr = a.priority end
        if a.at < at then at = a.at end
      end
    end
    if ok and #vs > 0 then
      table.sort(vs, function(x, y) return x.id < y.id end)
      units[#units + 1] = {victims = vs, gpus = 1, q = 1, priority = pr, at = at, id = vs[1].id}
    end
  end
  table.sort(units, victim_order)
  local taken, freed, total, victims = {}, 0, 0, {}
  for _, u in ipairs(units) do
    if freed >= need then break end
    if total + u.gpus <= need and keeps_guarantees(u.victims, view, taken) then
      freed, total = freed + u.q, total + u.gpus
      for _, a in ipairs(u.victims) do victims[#victims + 1] = a end
    end
  end
  if freed >= need then return plan_of(node, victims, total) end
  return nil
end

-- One node's plan for a shared request r (room on one GPU): plan or nil, and 'soon' when r
-- could get its room there within the grace period without one.
local function shared_node_plan(r, node, view, horizon)
  local best = nil
  for _, idx in ipairs(node_indexes(node)) do
    local g = rcall('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
      'memory_total_mb', 'excl', 'shared_n', 'name', 'memory_free_mb', 'shared_mb',
      'utilization')
    local total = tonumber(g[4]) or 0
    if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and total >= r.minm
        and model_matches(r.pat, g[7]) and (tonumber(g[10]) or 0) <= r.util then
      local excl = g[5] or ''
      local plan = nil
      if excl ~= '' then
        local a = view.by_id[excl]
        if (a and a.ends or NEVER) <= horizon then return nil, 'soon' end
        -- its exclusive holder frees the whole GPU: only one that holds this GPU alone
        if victim_ok(a, r) and a.n <= 1 and keeps_guarantees({a}, view, {}) then
          plan = plan_of(node, {a}, 1)
        end
      else
        -- room as the placement sees it, plus what holders leaving by the horizon reserved
        local room = total - (tonumber(g[9]) or 0)
        local free_mb = tonumber(g[8]) or 0
        if free_mb < room then room = free_mb end
        if room < 0 then room = 0 end
        -- and a slot: the holders staying past the horizon, fewer than MAX_SHARED
        local cands, staying = {}, 0
        for _, a in ipairs(view.shared[node .. '|' .. idx] or {}) do
          if a.ends <= horizon then
            room = room + a.mb
          else
            staying = staying + 1
            if victim_ok(a, r) then cands[#cands + 1] = a end
          end
        end
        if room >= r.minm and staying < MAX_SHARED then return nil, 'soon' end
        table.sort(cands, victim_order)
        local taken, victims = {}, {}
        for _, a in ipairs(cands) do
          if room >= r.minm and staying < MAX_SHARED then break end
          if keeps_guarantees({a}, view, taken) then
            victims[#victims + 1] = a
            room, staying = room + a.mb, staying - 1
          end
        end
        if room >= r.minm and staying < MAX_SHARED and #victims > 0 then
          plan = plan_of(node, victims, #victims)
        end
      end
      if plan and better_plan(plan, best) then best = plan end
    end
  end
  return best
end

-- The preemption plan for r: {node, victims, gpus} or nil (and 'soon' when r could get GPUs
-- within the grace period without one).
local function preemption_plan(r, view)
  local horizon = NOW + PREEMPT_GRACE
  local shared = r.sharing == 'shared'
  local best = nil
  local sizes = rcall('ZRANGEBYSCORE', K_SIZES, shared and 1 or r.k, '+inf')
  for _, node in ipairs(sizes) do
    local holder = rcall('HGET', K_RES, node)
    if node_ok(r, node) and node_alive(node) and (not holder or holder == r.id) then
      local plan, soon
      if shared then
        plan, soon = shared_node_plan(r, node, view, horizon)
      else
        plan, soon = exclusive_node_plan(r, node, view, horizon)
      end
      if soon then return nil, 'soon' end
      if plan and better_plan(plan, best) then best = plan end
    end
  end
  return best
end

-- GPUs already coming to tenant t through holds.
local function incoming(t, holds_by_node)
  local n = 0
  if holds_by_node then
    for _, id in pairs(holds_by_node) do
      local f = rcall('HMGET', k_req(id), 'tenant', 'required_gpus', 'sharing')
      if f[1] == t then
        n = n + (f[3] == 'shared' and 1 or (tonumber(f[2] or REC_DEFAULTS.required_gpus) or 0))
      end
    end
  end
  return n
end

-- May r preempt at all (before any look at the fleet)?
local function may_preempt(r, holds_by_node, holds_by_id)
  if not r or r.status ~= 'queued' or r.tenant == '' then return false end
  if holds_by_id and holds_by_id[r.id] then return false end
  local g = tenant_quota(r.tenant).guaranteed
  if g <= 0 or tenant_held(r.tenant) + incoming(r.tenant, holds_by_node) + alloc_gpus(r) > g then
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
  local tq = rcall('HGETALL', K_TQUEUED)
  for i = 1, #tq, 2 do
    if evals >= MAX_PREEMPT_EVALS then break end
    local t = tq[i]
    local g = tenant_quota(t).guaranteed
    if g > 0 and tenant_held(t) < g then
      for _, id in ipairs(rcall('ZRANGE', k_tqueue(t), 0, 49)) do
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
