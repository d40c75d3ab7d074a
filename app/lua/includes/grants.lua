--[[
  grants: giving GPUs to a request and ending requests (end_queued,
  fail_dependents, finish_alloc, finish_queued).
  Guarantees: one write of the record per grant; every ending frees what it held and
  appends its event.
]]

-- Give the chosen GPUs to the request. queued: it sits in the queue indexes; from_queue: the
-- client saw it queued (webhook). argv, at: allocate's new record, not written yet: its id,
-- submitted_at (NOW_S) and the fields argv[at..] join the grant's in one HSET, so the record
-- is written once (the grant's first: status and node sit at the head of the record, where
-- each read of them stops sooner; no table is built for the arguments). Returns what it wrote
-- of the grant's fields: expires_at, gpu_ids, gpu_uuids, and allocated_at and
-- wait_time_seconds (nil when not written: granted at its submission).
-- A one-GPU grant's gpu_ids and gpu_uuids as cjson.encode writes them, memoized per index and
-- per uuid (bounded like num's memo): an encode costs ~4.7k instructions, and the same GPUs
-- come back grant after grant. ONE_GPU: such a gpu_ids back to the index finish_alloc's match
-- would read from it (a table read instead of a pattern match, ~1.3k instructions).
-- (State in do ... end blocks: the library's main chunk is at Lua's limit of 200 locals.)
local ONE_GPU, json1 = {}, nil
do
  local ids, uuids, n = {}, {}, 0
  json1 = function(idx, uuid)
    local a, b = ids[idx], uuids[uuid]
    if not (a and b) then
      if n >= MEMO_MAX then ids, uuids, n, ONE_GPU = {}, {}, 0, {} end
      a, b = cjson.encode({num(idx)}), cjson.encode({uuid})
      ids[idx], uuids[uuid], n = a, b, n + 1
      ONE_GPU[a] = string.match(a, '^%[(%d+)%]$') or false
    end
    return a, b
  end
end

-- NOW + lease as ftime prints it. With the clock from TIME (NOW_SEC set) and a whole-second
-- lease (most are), the end has NOW_S's own microseconds and its seconds plus the lease,
-- printed once per second and lease: string.format('%.6f') costs ~5.9k instructions a grant.
-- The same digits: NOW is the double nearest NOW_S, adding whole seconds to it is exact (or,
-- across a power of two, off by less than 0.25 us), and '%.6f' rounds it back to NOW_S's
-- microseconds. A clock the caller passed (NOW_SEC nil) goes through ftime.
local lease_end
do
  local sec0, len0, end0
  lease_end = function(lease)
    if not NOW_SEC or lease % 1 ~= 0 then return ftime(NOW + lease) end
    if NOW_SEC ~= sec0 or lease ~= len0 then
      sec0, len0, end0 = NOW_SEC, lease, string.format('%d', tonumber(NOW_SEC) + lease)
    end
    return end0 .. string.sub(NOW_S, -7)
  end
end

local function grant(r, node, chosen, queued, from_queue, argv, at)
  local ids_json, uuids_json
  if #chosen == 1 then
    local g = chosen[1]
    take_gpu(r, node, g.idx)
    ids_json, uuids_json = json1(g.idx, g.uuid)
  else
    local ids, uuids = {}, {}
    for i, g in ipairs(chosen) do
      take_gpu(r, node, g.idx)
      ids[i] = num(g.idx)
      uuids[i] = g.uuid
    end
    ids_json, uuids_json = cjson.encode(ids), cjson.encode(uuids)
  end
  local expires, score = '', '+inf'
  if r.lease >= 0 then
    expires = lease_end(r.lease)
    score = expires
  end
  local wait = NOW - r.submitted
  if wait < 0 then wait = 0 end
  -- granted at its submission (the usual grant): allocated_at is submitted_at and the wait 0,
  -- which readers fill in (app/record.py, live_view): two fields fewer to write and read
  local rk = k_req(r.id)
  local alloc_at, waited
  if NOW ~= r.submitted then
    alloc_at, waited = NOW_S, ftime(wait)
    if argv then
      rcall('HSET', rk, 'status', 'allocated', 'node', node, 'gpu_ids', ids_json, 'gpu_uuids',
        uuids_json, 'expires_at', expires, 'allocated_at', alloc_at, 'wait_time_seconds',
        waited, 'id', r.id, 'submitted_at', NOW_S, unpack(argv, at))
    else
      rcall('HSET', rk, 'status', 'allocated', 'node', node, 'gpu_ids', ids_json, 'gpu_uuids',
        uuids_json, 'expires_at', expires, 'allocated_at', alloc_at, 'wait_time_seconds',
        waited)
    end
  elseif argv then
    rcall('HSET', rk, 'status', 'allocated', 'node', node, 'gpu_ids', ids_json, 'gpu_uuids',
      uuids_json, 'expires_at', expires, 'id', r.id, 'submitted_at', NOW_S, unpack(argv, at))
  else
    rcall('HSET', rk, 'status', 'allocated', 'node', node, 'gpu_ids', ids_json, 'gpu_uuids',
      uuids_json, 'expires_at', expires)
  end
  rcall('ZADD', K_LEASES, score, r.id)
  rcall('SADD', k_svc(r.svc), r.id)
  tenant_add(r.tenant, alloc_gpus(r))
  if queued then
    queue().dequeue(r.id, r.reserved, r.sharing, owner_bucket(r.owner, r.svc), r.tenant)
    notify(r.id, 'allocated')
  end
  local evid = event_gpus('allocated', r.id, r.svc or '', node, ids_json, uuids_json)
  stat_alloc(r.svc, 'allocated')
  if from_queue then
    stat('sched|from_queue')
    stat_wait(wait)
    outbox('allocated', r.id, evid, r.hook, nil, true,
      {expires_at = expires, lease_seconds = fnum(r.lease)})
  end -- sched|immediate is not counted: Engine.stats() derives it (grants - from_queue)
  return expires, ids_json, uuids_json, alloc_at, waited
end

-- End a queued request (cancelled | timed_out) without looking at its dependents. reason and
-- cause: set when the engine cancels it because dependency `cause` failed. Returns whether
-- requests wait on it with depends_on_mode ok. A mode-ok request leaves the k_deps sets of
-- what it waited on (allocate added it): else submitting and cancelling dependents of one
-- long lease grows that set without bound, and fail_dependents reads all of it. leaving
-- (fail_dependents'): dependency -> ids, removed later with one SREM per set, not per id.
local function end_queued(id, status, reason, cause, leaving)
  local rk = k_req(id)
  local f = rcall('HMGET', rk, 'service_name', 'webhook_url', 'webhook_events',
    'reserved_node', 'sharing', 'ok_dependents', 'owner', 'tenant', 'depends_on_mode',
    'depends_on')
  queue().dequeue(id, f[4], f[5] or REC_DEFAULTS.sharing, owner_bucket(f[7], f[1]),
    f[8] or '')
  if f[9] == 'ok' and f[10] then
    for _, dep in ipairs(cjson.decode(f[10])) do
      if leaving then
        local ids = leaving[dep]
        if not ids then ids = {}; leaving[dep] = ids end
        ids[#ids + 1] = id
      else
        rcall('SREM', k_deps(dep), id)
      end
    end
  end
  if reason then
    rcall('HSET', rk, 'status', status, 'ended_at', NOW_S, 'reason', reason,
      'failed_dependency', cause)
  else
    rcall('HSET', rk, 'status', status, 'ended_at', NOW_S)
  end
  rcall('EXPIRE', rk, HIST_TTL_S)
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
-- Remove the ids gathered in leaving (dependency -> ids; end_queued) from the k_deps sets:
-- one SREM per set and 500 ids, not one per id and set. gone: sets deleted already.
local function leave_deps(leaving, gone)
  for dep, ids in pairs(leaving) do
    if not (gone and gone[dep]) then
      for j = 1, #ids, 500 do
        rcall('SREM', k_deps(dep), unpack(ids, j, math.min(j + 499, #ids)))
      end
    end
  end
end

-- outer: a caller's leaving table (the reap's), flushed by that caller
local function fail_dependents(id, outer)
  local work, i, leaving, gone = {id}, 1, outer or {}, {}
  while i <= #work do
    local cause = work[i]
    i = i + 1
    local dk = k_deps(cause)
    for _, d in ipairs(rcall('SMEMBERS', dk)) do
      if rcall('HGET', k_req(d), 'status') == 'queued' then
        if end_queued(d, 'cancelled', 'dependency_failed', cause, leaving) then
          work[#work + 1] = d
        end
      end
    end
    rcall('DEL', dk)
    gone[cause] = true
  end
  -- the cancelled leave the sets of their other dependencies (a 3,000-request cascade with
  -- 64 dependencies each: 0.99-1.30 s of Redis with an SREM per id and set, 0.52-0.69 s
  -- batched; 0.22-0.62 s when they stayed in the sets)
  if not outer then leave_deps(leaving, gone) end
end

-- A victim of a guarantee preemption ended: the queued request it was preempted for (rid)
-- waits for one fewer; after the last, its hold lasts HB_TIMEOUT more (the monitor's next
-- report shows the memory freed) and then lapses if it still does not fit (pass.lua).
local function victim_ended(rid)
  if not rid or rid == '' then return end
  local rk = k_req(rid)
  if rcall('HGET', rk, 'status') ~= 'queued' then return end
  if rcall('HINCRBY', rk, 'preempt_pending', -1) <= 0 then
    rcall('HSET', rk, 'hold_until', ftime(NOW + HB_TIMEOUT))
  end
end

-- The record fields finish_alloc reads, in this order. release reads the first RELEASE_READ
-- with its own checks; the last three, absent from most records (each field asked for costs
-- ~1.7k server instructions, found or not), finish_alloc then reads only when it needs one:
-- min_memory_mb for a shared allocation, webhook_events when a webhook_url may be told,
-- preempted_for for a preempting allocation its holder releases.
local FINISH_FIELDS = {'node', 'gpu_ids', 'sharing', 'service_name', 'webhook_url',
  'ok_dependents', 'tenant', 'watched', 'min_memory_mb', 'webhook_events', 'preempted_for'}
local RELEASE_READ = 8

-- End a live allocation (released | expired | lost | preempted): give its GPUs back. read: the
-- HMGET of FINISH_FIELDS[1..RELEASE_READ] (then any more fields) when the caller already made
-- it (release), else nil. by_holder: its holder released it (released_at is set; a preempting
-- allocation its holder releases ends as preempted). A lost allocation (its node was
-- forgotten) and a preempted one are always notified when they have a webhook_url.
local function finish_alloc(id, status, read, by_holder)
  local rk = k_req(id)
  local f = read or rcall('HMGET', rk, unpack(FINISH_FIELDS))
  local node, sharing = f[1], f[3] or REC_DEFAULTS.sharing
  local svc, url = f[4] or '', f[5]
  local always = status == 'lost' or status == 'preempted'
  local minm, events, pf
  if read then
    minm = sharing == 'shared' and num(rcall('HGET', rk, 'min_memory_mb')) or 0
    if url and url ~= '' and not always then events = rcall('HGET', rk, 'webhook_events') end
    if status == 'preempted' then pf = rcall('HGET', rk, 'preempted_for') end
  else
    minm, events, pf = num(f[9]) or 0, f[10], f[11]
  end
  local raw = f[2] or '[]'
  -- one GPU (most allocations): no decode
  local one = ONE_GPU[raw]
  if one == nil then one = string.match(raw, '^%[(%d+)%]$') end
  local nids = 1
  if one then
    return_gpu(id, sharing, minm, node, one)
  else
    local ids = cjson.decode(raw)
    for _, i in ipairs(ids) do return_gpu(id, sharing, minm, node, string.format('%d', i)) end
    nids = #ids
  end
  tenant_add(f[7], -nids)
  local now = NOW_S
  if status == 'released' then
    -- released_at is ended_at: not stored (app/record.py fills it in for status released)
    rcall('HSET', rk, 'status', status, 'ended_at', now)
  elseif by_holder then
    rcall('HSET', rk, 'status', status, 'released_at', now, 'ended_at', now)
  else
    rcall('HSET', rk, 'status', status, 'ended_at', now)
  end
  rcall('EXPIRE', rk, HIST_TTL_S)
  rcall('ZREM', K_LEASES, id)
  rcall('SREM', k_svc(svc), id)
  bump_capacity()
  -- a release by its holder: nobody long-polls it unless watch.lua marked it
  if not read or f[8] then notify(id, status) end
  local evid = event_gpus(status, id, svc, node or '', f[2] or '[]', nil)
  stat_alloc(svc, status)
  outbox(status, id, evid, url, events, always)
  victim_ended(pf)
  if f[6] == '1' then
    if status == 'released' then
      rcall('DEL', k_deps(id))  -- its ok-dependents may run now; nothing left to cancel
    else
      fail_dependents(id)
    end
  end
end

-- What release reads of a record: FINISH_FIELDS[1..RELEASE_READ], then its status and owner
-- (the owner only when a principal must own it). Built once, when the library loads (where no
-- global such as unpack or ipairs may be read).
local RELEASE_FIELDS_NO_OWNER, RELEASE_FIELDS = {}, {}
for i = 1, RELEASE_READ do
  RELEASE_FIELDS_NO_OWNER[i], RELEASE_FIELDS[i] = FINISH_FIELDS[i], FINISH_FIELDS[i]
end
RELEASE_FIELDS_NO_OWNER[RELEASE_READ + 1] = 'status'
RELEASE_FIELDS[RELEASE_READ + 1], RELEASE_FIELDS[RELEASE_READ + 2] = 'status', 'owner'

-- End a queued request (cancelled | timed_out). Its any-dependents may now run (capver is
-- bumped); its ok-dependents are cancelled. leaving: the reap's (leave_deps after its loop).
local function finish_queued(id, status, leaving)
  if end_queued(id, status, nil, nil, leaving) then fail_dependents(id, leaving) end
end

local function top_score(key)
  local t = rcall('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  if #t == 0 then return -1 end
  return tonumber(t[2])
end
