--[[
  queue: the queue's functions (dequeue, enqueue, then the reservations and the pass, included
  in the same closure) and schedule, the entry point of every pass.
  They are built on first use in a call (begin_call drops them): they keep per-pass state
  (dq_ids, dq_owners: bucket -> tenant -> n) that an error in the middle of a pass must not
  hand to the next call, and the usual allocate or release (an empty queue) needs none of them.
  Guarantees: a request leaves every queue index together (dequeue / dequeue_flush); schedule
  on an empty queue is one ZCARD.
]]
queue = function()
  if queue_fns then return queue_fns end
  -- Remove a request from every queue index; drop its reservation (that frees a node for others).
  -- Inside a pass (dq_ids set) the ids are collected and leave the indexes together, one call
  -- per index, in dequeue_flush: the pass flushes before it reads the queue again.
  -- tenant: the record's tenant ('' = none, a record from before tenants: not counted).
  local dq_ids, dq_owners, dq_tenants = nil, nil, nil
  local function dequeue(id, reserved, sharing, bucket, tenant)
    if not bucket then
      local f = rcall('HMGET', k_req(id), 'owner', 'service_name', 'tenant')
      bucket = owner_bucket(f[1], f[2])
      tenant = f[3]
    end
    tenant = tenant or ''
    if dq_ids then
      dq_ids[#dq_ids + 1] = id
      local o = dq_owners[bucket]
      if not o then o = {}; dq_owners[bucket] = o end
      o[tenant] = (o[tenant] or 0) - 1
      if tenant ~= '' then
        local l = dq_tenants[tenant]
        if not l then l = {}; dq_tenants[tenant] = l end
        l[#l + 1] = id
      end
    else
      owner_count(bucket, -1, tenant)
      if tenant ~= '' then
        tenant_queue_add(tenant, -1)
        rcall('ZREM', k_tqueue(tenant), id)
      end
      rcall('ZREM', K_QUEUE, id)
      qlen = nil
      rcall('HDEL', K_QSHAPE, id)
      if sharing ~= 'shared' then rcall('ZREM', K_QDX, id) end
      if sharing ~= 'exclusive' then rcall('ZREM', K_QDS, id) end
      rcall('ZREM', K_QDEAD, id)
      rcall('ZREM', K_QUNRES, id)
    end
    if reserved and reserved ~= '' then
      if rcall('HGET', K_RES, reserved) == id then
        rcall('HDEL', K_RES, reserved)
        rcall('HDEL', k_holds(), reserved) -- a preemption's hold, if it was one
        bump_capacity()
      end
    end
  end

  local function dequeue_flush()
    if dq_ids and #dq_ids > 0 then
      for _, key in ipairs({K_QUEUE, K_QDX, K_QDS, K_QDEAD, K_QUNRES}) do
        rcall('ZREM', key, unpack(dq_ids))
      end
      qlen = nil
      rcall('HDEL', K_QSHAPE, unpack(dq_ids))
      for bucket, o in pairs(dq_owners) do
        for t, n in pairs(o) do owner_count(bucket, n, t) end
      end
      for t, l in pairs(dq_tenants) do
        tenant_queue_add(t, -#l)
        rcall('ZREM', k_tqueue(t), unpack(l))
      end
    end
    dq_owners, dq_tenants = {}, {}
  end

  -- Queue rank score, lowest first. With aging, effective priority p + AGING * (now - s) orders
  -- like p - AGING * s, so the score AGING * s - p never has to change. s is made strictly
  -- increasing (10 us apart at least) so equal times still queue FIFO, and is taken relative
  -- to 1.7e9 s to keep the double's precision for that step.
  local function enqueue(r, queue_timeout)
    local score
    if AGING > 0 then
      local s = r.submitted
      local last = tonumber(rcall('HGET', K_META, 'last_submit') or '0') or 0
      if s <= last then s = last + 0.00001 end
      rcall('HSET', K_META, 'last_submit', fnum(s))
      score = AGING * (s - 1700000000) - r.priority
    else
      score = -r.priority * 1e12 + rcall('HINCRBY', K_META, 'seq', 1)
    end
    rcall('ZADD', K_QUEUE, fnum(score), r.id)
    qlen = nil
    rcall('HSET', K_QSHAPE, r.id, r.sharing .. '|' .. r.k .. '|' .. r.minm .. '|' .. r.maxm ..
      '|' .. r.util .. '|' .. r.pref_raw .. '|' .. r.pat .. '|' .. r.nodes_raw .. '|L' ..
      fnum(r.lease))
    if r.sharing == 'shared' then
      rcall('ZADD', K_QDS, r.minm, r.id)
    else
      rcall('ZADD', K_QDX, r.k, r.id)
    end
    rcall('ZADD', K_QDEAD, ftime(r.submitted + queue_timeout), r.id)
    rcall('ZADD', K_QUNRES, ftime(r.submitted), r.id)
    owner_count(owner_bucket(r.owner, r.svc), 1, r.tenant)
    if r.tenant ~= '' then
      tenant_queue_add(r.tenant, 1)
      rcall('ZADD', k_tqueue(r.tenant), fnum(score), r.id)
    end
  end

-- @include reservations

-- @include pass
  queue_fns = {dequeue = dequeue, enqueue = enqueue, pass = pass, reserve_new = reserve_new}
  return queue_fns
end

local function schedule(new_id, force)
  -- an empty queue (the usual case for a release) has nothing to pass over: one ZCARD, shared
  -- with bump_capacity's
  if queue_len() == 0 then return {} end
  stat_buf, meta_buf = {}, {}
  local granted = queue().pass(new_id, force)
  -- the periodic pass: tenants below their guarantee may preempt (includes/preemption.lua);
  -- with no grace period the victims ended already, and another pass places the request
  if force and PREEMPT == '1' and preempt_for_guarantees(nil, true) > 0 and PREEMPT_GRACE <= 0 then
    for _, id in ipairs(queue().pass(nil, true)) do granted[#granted + 1] = id end
  end
  stat_flush()
  return granted
end
