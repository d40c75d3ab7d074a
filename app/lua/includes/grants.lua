--[[
  grants: giving GPUs to a request and ending requests (end_queued,
  fail_dependents, finish_alloc, finish_queued).
  Guarantees: one write of the record per grant; every ending frees what it held and
  appends its event.
]]

-- Give the chosen GPUs to the request. queued: it sits in the queue indexes; from_queue: the
-- client saw it queued (webhook). pending: an HSET of the record not sent yet (allocate's new
-- record), which the grant's fields join, so the record is written once. Returns the fields
-- it wrote.
local function grant(r, node, chosen, queued, from_queue, pending)
  local ids, uuids = {}, {}
  for i, g in ipairs(chosen) do
    take_gpu(r, node, g.idx)
    ids[i] = num(g.idx)
    uuids[i] = g.uuid
  end
  local expires, score = '', '+inf'
  if r.lease >= 0 then
    expires = ftime(NOW + r.lease)
    score = expires
  end
  local wait = NOW - r.submitted
  if wait < 0 then wait = 0 end
  local ids_json, uuids_json = cjson.encode(ids), cjson.encode(uuids)
  local out = {'status', 'allocated', 'node', node, 'gpu_ids', ids_json, 'gpu_uuids', uuids_json,
    'expires_at', expires}
  -- granted at its submission (the usual grant): allocated_at is submitted_at and the wait 0,
  -- which readers fill in (app/record.py, live_view): two fields fewer to write and read
  if NOW ~= r.submitted then
    out[11], out[12], out[13], out[14] = 'allocated_at', NOW_S, 'wait_time_seconds', ftime(wait)
  end
  if pending then
    local n = #pending
    for i = 1, #out do pending[n + i] = out[i] end
    redis.call(unpack(pending))
  else
    redis.call('HSET', k_req(r.id), unpack(out))
  end
  redis.call('ZADD', K_LEASES, score, r.id)
  redis.call('SADD', k_svc(r.svc), r.id)
  tenant_add(r.tenant, alloc_gpus(r))
  if queued then
    queue().dequeue(r.id, r.reserved, r.sharing, owner_bucket(r.owner, r.svc), r.tenant)
    notify(r.id, 'allocated')
  end
  local evid = event('allocated', r.id, r.svc, {'node', node, 'gpu_ids', ids_json,
    'gpu_uuids', uuids_json})
  stat_alloc(r.svc, 'allocated')
  if from_queue then
    stat('sched|from_queue')
    stat_wait(wait)
    outbox('allocated', r.id, evid, r.hook, nil, true,
      {expires_at = expires, lease_seconds = fnum(r.lease)})
  end -- sched|immediate is not counted: Engine.stats() derives it (grants - from_queue)
  return out
end

-- End a queued request (cancelled | timed_out) without looking at its dependents. reason and
-- cause: set when the engine cancels it because dependency `cause` failed. Returns whether
-- requests wait on it with depends_on_mode ok.
local function end_queued(id, status, reason, cause)
  local rk = k_req(id)
  local f = redis.call('HMGET', rk, 'service_name', 'webhook_url', 'webhook_events',
    'reserved_node', 'sharing', 'ok_dependents', 'owner', 'tenant')
  queue().dequeue(id, f[4], f[5] or REC_DEFAULTS.sharing, owner_bucket(f[7], f[1]),
    f[8] or '')
  if reason then
    redis.call('HSET', rk, 'status', status, 'ended_at', NOW_S, 'reason', reason,
      'failed_dependency', cause)
  else
    redis.call('HSET', rk, 'status', status, 'ended_at', NOW_S)
  end
  redis.call('EXPIRE', rk, HIST_TTL_S)
  bump_capacity()
  notify(id, status)
  local evid = event(status, id, f[1], reason and {'reason', reason, 'dependency', cause} or nil)
  stat_alloc(f[1], status)
  outbox(status, id, evid, f[2], f[3], false)
  return f[6] == '1'
end

--[[
  `id` ended otherwise than released: every request waiting on it with depends_on_mode ok can
  never run. Each still queued is cancelled (reason dependency_failed, its cancelled event and
  webhook), and so on down the chain, in this same script: no pass can grant a dependent in
  between. A worklist, not recursion, so a chain of any length fits Lua's stack.
]]
local function fail_dependents(id)
  local work, i = {id}, 1
  while i <= #work do
    local cause = work[i]
    i = i + 1
    local dk = k_deps(cause)
    for _, d in ipairs(redis.call('SMEMBERS', dk)) do
      if redis.call('HGET', k_req(d), 'status') == 'queued' then
        if end_queued(d, 'cancelled', 'dependency_failed', cause) then work[#work + 1] = d end
      end
    end
    redis.call('DEL', dk)
  end
end

-- A victim of a guarantee preemption ended: the queued request it was preempted for (rid)
-- waits for one fewer; after the last, its hold lasts HB_TIMEOUT more (the monitor's next
-- report shows the memory freed) and then lapses if it still does not fit (pass.lua).
local function victim_ended(rid)
  if not rid or rid == '' then return end
  local rk = k_req(rid)
  if redis.call('HGET', rk, 'status') ~= 'queued' then return end
  if redis.call('HINCRBY', rk, 'preempt_pending', -1) <= 0 then
    redis.call('HSET', rk, 'hold_until', ftime(NOW + HB_TIMEOUT))
  end
end

-- The record fields finish_alloc reads, in this order (FINISH_FIELDS[11] 'watched').
local FINISH_FIELDS = {'node', 'gpu_ids', 'sharing', 'min_memory_mb', 'service_name',
  'webhook_url', 'webhook_events', 'ok_dependents', 'tenant', 'preempted_for', 'watched'}

-- End a live allocation (released | expired | lost | preempted): give its GPUs back. read: the
-- HMGET of FINISH_FIELDS (then any more fields) when the caller already made it (release), else
-- nil. by_holder: its holder released it (released_at is set; a preempting allocation its
-- holder releases ends as preempted). A lost allocation (its node was forgotten) and a
-- preempted one are always notified when they have a webhook_url.
local function finish_alloc(id, status, read, by_holder)
  local rk = k_req(id)
  local f = read or redis.call('HMGET', rk, unpack(FINISH_FIELDS))
  local node, sharing, minm = f[1], f[3] or REC_DEFAULTS.sharing, num(f[4]) or 0
  local svc = f[5] or ''
  local raw = f[2] or '[]'
  local one = string.match(raw, '^%[(%d+)%]$') -- one GPU (most allocations): no decode
  local ids = one and {one} or cjson.decode(raw)
  for _, i in ipairs(ids) do
    return_gpu(id, sharing, minm, node, one or string.format('%d', i))
  end
  tenant_add(f[9], -#ids)
  local now = NOW_S
  if status == 'released' then
    -- released_at is ended_at: not stored (app/record.py fills it in for status released)
    redis.call('HSET', rk, 'status', status, 'ended_at', now)
  elseif by_holder then
    redis.call('HSET', rk, 'status', status, 'released_at', now, 'ended_at', now)
  else
    redis.call('HSET', rk, 'status', status, 'ended_at', now)
  end
  redis.call('EXPIRE', rk, HIST_TTL_S)
  redis.call('ZREM', K_LEASES, id)
  redis.call('SREM', k_svc(svc), id)
  bump_capacity()
  -- a release by its holder: nobody long-polls it unless watch.lua marked it
  if not read or f[11] then notify(id, status) end
  local evid = event(status, id, svc, {'node', node or '', 'gpu_ids', f[2] or '[]'})
  stat_alloc(svc, status)
  outbox(status, id, evid, f[6], f[7], status == 'lost' or status == 'preempted')
  victim_ended(f[10])
  if f[8] == '1' then
    if status == 'released' then
      redis.call('DEL', k_deps(id))  -- its ok-dependents may run now; nothing left to cancel
    else
      fail_dependents(id)
    end
  end
end

-- What release reads of a record: FINISH_FIELDS, then its status and owner.
local RELEASE_FIELDS = {'node', 'gpu_ids', 'sharing', 'min_memory_mb', 'service_name',
  'webhook_url', 'webhook_events', 'ok_dependents', 'tenant', 'preempted_for', 'watched',
  'status', 'owner'}

-- End a queued request (cancelled | timed_out). Its any-dependents may now run (capver is
-- bumped); its ok-dependents are cancelled.
local function finish_queued(id, status)
  if end_queued(id, status) then fail_dependents(id) end
end

local function top_score(key)
  local t = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  if #t == 0 then return -1 end
  return tonumber(t[2])
end
