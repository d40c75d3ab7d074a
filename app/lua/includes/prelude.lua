--[[
  prelude: the pieces every engine function shares.

  Loaded once as the Redis Functions library engine.LIBRARY (app/engine.py, library_source): these
  includes at the top, then one function per app/lua/<command>.lua, each starting with
  begin_call (includes/call.lua), which binds the per-call names below. Every function takes:
    KEYS     the fixed keys, in the order of engine.FIXED_KEYS (all under the prefix's hash tag;
             keys derived at run time use the same prefix, so the engine stays one slot):
      K_NODES K_FREE K_SIZES K_GPUS K_SHARED K_QUEUE K_QDX K_QDS K_QDEAD K_QUNRES K_RES K_LEASES
      K_EVENTS K_OUTBOX K_STATS K_META K_QSHAPE K_SVCLABELS K_QOWNERS K_CHANGES: nodes,
      nodes_free, node_sizes, gpus, shared_capacity, queue, queue_demand:exclusive,
      queue_demand:shared, queue_deadlines, queue_unreserved, reservations, leases, events,
      webhook_outbox, stats, meta, queue_shapes, stats_services, queue_owners; and the changes
      Pub/Sub channel (a channel, not a key, passed with them for one place of truth)
    ARGV[1]  now (epoch seconds; "" = use Redis TIME, one clock for every replica)
    ARGV[2]  the library version the caller expects (a mismatch answers {-11, version}: the
             caller loads its library and retries)
    ARGV[3]  the key prefix, for the key builders k_node(n) k_gpu(n, i) k_req(id) k_deps(id)
             k_svc(s) k_idem(k) k_free(n) (node, gpu, request, dependents, service,
             idempotency, node_free_gpus; concatenation, no string.format)
    ARGV[4..] the scheduler settings, in the order of engine.SETTINGS:
      POLICY (best_effort|strict_fifo)  AGING (priority points per second)
      RES_AFTER (s; < 0 = off)  HB_TIMEOUT (s)  FORGET_AFTER (s; <= 0 = never)  EV_MAX
      HIST_TTL (s; HIST_TTL_S: whole seconds, as a string)  MAX_QUEUE  MAX_OWNER (queued
      requests per owner)  MAX_SVC_LABELS (services with their own stats label)
    Each function's own arguments start at ARGV[A + 1].
  MAX_LEASE (s; the longest lease there is) is a literal of the library.

  Errors are returned, not raised: { negative code, details... } (see ERRORS in app/engine.py).

  GPU hash fields owned by the engine (the monitor owns the telemetry fields):
    excl      id of the exclusive allocation holding it ("" = none)
    shared_n  number of shared allocations on it;  shared_mb  MB they reserve
    cordoned  "1" when an admin made it unschedulable;  lost  "1" when its node stopped reporting it
    in_free   "1" while counted in nodes_free and listed in the node's node_free_gpus hash
    in_busy   "1" while counted as allocated (meta gpus_busy)
  Node hash fields an admin owns: cordoned "1" (GPUs the node reports later arrive cordoned),
  draining "1" (cordoned, waiting for its allocations to end).
]]
-- @constants
local NOW, NOW_S -- set per call by begin_call (includes/call.lua)

local function ftime(x) return string.format('%.6f', x) end
local function fnum(x) return string.format('%.17g', x) end

-- A lease as sent or stored -> seconds, -1 = no expiry. Never endless by accident: anything
-- that is not a number, NaN, or longer than MAX_LEASE (inf included) becomes MAX_LEASE, so
-- every expiry is a finite, representable time whatever a record holds.
local function lease_secs(x)
  x = tonumber(x)
  if x == nil or x ~= x or x > MAX_LEASE then return MAX_LEASE end
  if x < 0 then return -1 end
  return x
end

local WAIT_BUCKETS = {'0.005', '0.01', '0.025', '0.05', '0.1', '0.25', '0.5', '1', '2.5', '5',
  '10', '30', '60', '120', '300', '600', '1800', '3600'}

-- Counters (the stats hash, and meta's gpus_free / gpus_busy). Inside a schedule pass they are
-- summed in Lua and written once per field at the end of the pass (a pass granting 1,000
-- requests writes a handful of fields, not 6,000). Nothing reads them during a script.
local stat_buf, meta_buf = nil, nil
local function stat(field, n)
  if stat_buf then
    stat_buf[field] = (stat_buf[field] or 0) + (n or 1)
  else
    redis.call('HINCRBY', K_STATS, field, n or '1')
  end
end

local function meta_incr(field, n)
  if meta_buf then
    meta_buf[field] = (meta_buf[field] or 0) + n
  else
    redis.call('HINCRBY', K_META, field, n == 1 and '1' or n == -1 and '-1' or n)
  end
end

local function stat_flush()
  if not stat_buf then return end
  for field, n in pairs(stat_buf) do
    if field == 'wait|sum' then
      redis.call('HINCRBYFLOAT', K_STATS, field, string.format('%.6f', n))
    else
      redis.call('HINCRBY', K_STATS, field, n)
    end
  end
  for field, n in pairs(meta_buf) do
    if n ~= 0 then redis.call('HINCRBY', K_META, field, n) end
  end
  stat_buf, meta_buf = nil, nil
end

-- One grant's queue wait (only for grants from the queue). The histogram's count is
-- sched|immediate + sched|from_queue (every grant is one of the two), so only the bucket and
-- the sum are written here. An immediate grant waited 0 s: Engine.stats() counts it in the
-- first bucket, which saves the hot path a write.
local function stat_wait(wait)
  local label = '+Inf'
  for _, b in ipairs(WAIT_BUCKETS) do
    if wait <= tonumber(b) then label = b; break end
  end
  stat('wait|le|' .. label)
  if wait > 0 then
    if stat_buf then
      stat_buf['wait|sum'] = (stat_buf['wait|sum'] or 0) + wait
    else
      redis.call('HINCRBYFLOAT', K_STATS, 'wait|sum', string.format('%.6f', wait))
    end
  end
end

-- The service part of an ``alloc|<service>|<status>`` stats field: the service's own name for
-- the first MAX_SVC_LABELS services ever counted (kept in K_SVCLABELS), 'other' past them, so
-- no number of service names grows the stats hash or /metrics without bound.
local svc_labels = {}
local function svc_label(svc)
  svc = svc or ''
  local v = svc_labels[svc]
  if v == nil then
    if redis.call('SISMEMBER', K_SVCLABELS, svc) == 1 then
      v = svc
    elseif redis.call('SCARD', K_SVCLABELS) < MAX_SVC_LABELS then
      redis.call('SADD', K_SVCLABELS, svc)
      v = svc
    else
      v = 'other'
    end
    svc_labels[svc] = v
  end
  return v
end

-- Whose share of the queue a request counts against (K_QOWNERS field): its owner (the API
-- key's principal), or its service when auth is off and there is no owner.
local function owner_bucket(owner, svc)
  if owner and owner ~= '' then return 'o:' .. owner end
  return 's:' .. (svc or '')
end

local function owner_count(bucket, n)
  if redis.call('HINCRBY', K_QOWNERS, bucket, n) <= 0 then
    redis.call('HDEL', K_QOWNERS, bucket)
  end
end

-- built on first use, below
local queue, queue_fns

local function bump_capacity() redis.call('HINCRBY', K_META, 'capver', '1') end

-- Append one event to the capped stream; returns its entry id.
local function event(name, id, svc, extra)
  local args = {'XADD', K_EVENTS, 'MAXLEN', '~', EV_MAX, '*', 'event', name,
    'request_id', id or '', 'service_name', svc or '', 'ts', NOW_S}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  return redis.call(unpack(args))
end

-- Queue a webhook delivery when the record has a URL and (for non-grant events) opted in.
-- pinned: fields as they were at the event, which a later change (a renewal) must not alter
-- in the payload (every try of one event sends the same body). extra: more fields for the
-- entry (gpu_unhealthy names the node and the GPUs), or nil.
local function outbox(name, id, event_id, url, events_json, always, pinned, extra)
  if url == nil or url == '' then return end
  if not always then
    local ok = false
    for _, e in ipairs(cjson.decode(events_json or '[]')) do
      if e == name then ok = true end
    end
    if not ok then return end
  end
  local entry = {event_id = event_id, event = name, request_id = id, ts = NOW, pinned = pinned}
  if extra then
    for k, v in pairs(extra) do entry[k] = v end
  end
  redis.call('RPUSH', K_OUTBOX, cjson.encode(entry))
end

-- Wake the API calls long-polling this request (app/longpoll.py): one PUBLISH per status
-- change of a request that someone may be waiting on (a queued request leaving the queue, a
-- live allocation ending or changing state). Redis delivers it after the script, so a waiter
-- that wakes reads the new status. Without subscribers a PUBLISH costs one dictionary lookup.
local function notify(id, status)
  redis.call('PUBLISH', K_CHANGES, id .. '|' .. status)
end

local function split_member(m) return string.match(m, '^(.*)|([^|]*)$') end

local alive_cache = {}
local function node_alive(node)
  local v = alive_cache[node]
  if v == nil then
    local hb = redis.call('ZSCORE', K_NODES, node)
    v = (hb and tonumber(hb) >= NOW - HB_TIMEOUT) and true or false
    alive_cache[node] = v
  end
  return v
end

local index_cache = {}
local function node_indexes(node)
  local v = index_cache[node]
  if v == nil then
    v = {}
    local s = redis.call('HGET', k_node(node), 'indexes')
    if s then
      for idx in string.gmatch(s, '[^,]+') do v[#v + 1] = idx end
    end
    index_cache[node] = v
  end
  return v
end

-- Recompute one GPU's place in the indexes after any change to it. Capacity that appears
-- (a GPU turning free, more reservable memory) bumps meta.capver so the next pass rescans.
local function gpu_sync(node, idx)
  local gk = k_gpu(node, idx)
  local f = redis.call('HMGET', gk, 'excl', 'shared_n', 'health', 'cordoned', 'lost',
    'memory_free_mb', 'shared_mb', 'in_free', 'in_busy', 'utilization', 'uuid',
    'memory_total_mb')
  local excl = f[1] or ''
  local sn = tonumber(f[2] or '0') or 0
  local ok = f[3] == 'ok' and f[4] ~= '1' and f[5] ~= '1'
  local free = ok and excl == '' and sn == 0
  local busy = excl ~= '' or sn > 0
  if free ~= (f[8] == '1') then
    redis.call('ZINCRBY', K_FREE, free and 1 or -1, node)
    meta_incr('gpus_free', free and 1 or -1)
    redis.call('HSET', gk, 'in_free', free and '1' or '0')
    if free then bump_capacity() end
  end
  if free then
    redis.call('HSET', k_free(node), idx, (f[6] or '0') .. '|' .. (f[10] or '0') .. '|' ..
      (f[11] or ''))
  elseif f[8] == '1' then
    redis.call('HDEL', k_free(node), idx)
  end
  if busy ~= (f[9] == '1') then
    meta_incr('gpus_busy', busy and 1 or -1)
    redis.call('HSET', gk, 'in_busy', busy and '1' or '0')
  end
  local member = node .. '|' .. idx
  local old = redis.call('ZSCORE', K_SHARED, member)
  if ok and excl == '' then
    -- room for shared requests: total - max(reserved, used), i.e. what is neither reserved
    -- nor in use (a running shared job's memory shows in the reading and in its reservation;
    -- counting both would halve packing on real GPUs). See docs/engine.md, Placement.
    local free_mb = tonumber(f[6] or '0') or 0
    local cap = (tonumber(f[12] or '0') or 0) - (tonumber(f[7] or '0') or 0)
    if free_mb < cap then cap = free_mb end
    if cap < 0 then cap = 0 end
    if old == false or tonumber(old) ~= cap then
      redis.call('ZADD', K_SHARED, cap, member)
      if old == false or tonumber(old) < cap then bump_capacity() end
    end
  elseif old then
    redis.call('ZREM', K_SHARED, member)
  end
end

-- A request as the scheduler sees it.
local REQ_FIELDS = {'service_name', 'sharing', 'required_gpus', 'min_memory_mb', 'max_memory_mb',
  'max_utilization', 'preferred_gpus', 'depends_on', 'submitted_at', 'webhook_url',
  'webhook_events', 'lease_seconds', 'priority', 'reserved_node', 'status', 'owner',
  'gpu_pattern', 'nodes', 'depends_on_mode'}

local function req_from(id, f)
  local r = {id = id, svc = f[1], sharing = f[2], k = tonumber(f[3]), minm = tonumber(f[4]),
    maxm = tonumber(f[5]), util = tonumber(f[6]), pref_raw = f[7] or '[]',
    deps_raw = f[8] or '[]', submitted = tonumber(f[9]), hook = f[10] or '',
    hook_events = f[11] or '[]', lease = lease_secs(f[12]), priority = tonumber(f[13]),
    reserved = f[14] or '', status = f[15], owner = f[16] or '', pat = f[17] or '',
    nodes_raw = f[18] or '[]', mode = f[19] or 'any'}
  -- gpu_model as an anchored Lua pattern on the lower-cased GPU name ('' = any model) and the
  -- nodes it may use (nil = any node): both set by the client, checked in placement
  if r.nodes_raw ~= '[]' then
    r.nodes = {}
    for _, n in ipairs(cjson.decode(r.nodes_raw)) do r.nodes[n] = true end
  end
  r.pref = {}
  r.npref = 0
  if r.pref_raw ~= '[]' then
    for _, p in ipairs(cjson.decode(r.pref_raw)) do
      local key = string.format('%d', p)
      if not r.pref[key] then r.pref[key] = true; r.npref = r.npref + 1 end
    end
  end
  return r
end

local function load_req(id)
  local f = redis.call('HMGET', k_req(id), unpack(REQ_FIELDS))
  if not f[15] then return nil end
  return req_from(id, f)
end

-- May the request use this node (its nodes list), and this GPU (its gpu_model)?
local function node_ok(r, node) return r.nodes == nil or r.nodes[node] == true end

local function model_matches(pat, name)
  return pat == '' or string.find(string.lower(name or ''), pat) ~= nil
end

local function model_ok(r, node, idx)
  if r.pat == '' then return true end
  return model_matches(r.pat, redis.call('HGET', k_gpu(node, idx), 'name'))
end

-- True when nothing the request depends on is still queued or live. depends_on_mode ok also
-- needs each to have been released (a record gone with its history was: a dependency that
-- ended otherwise cancels its ok-dependents at once, see fail_dependents).
local function deps_done(r)
  if r.deps_raw == '[]' then return true end
  local ok_mode = r.mode == 'ok'
  for _, dep in ipairs(cjson.decode(r.deps_raw)) do
    local st = redis.call('HGET', k_req(dep), 'status')
    if st == 'queued' or st == 'allocated' then return false end
    if ok_mode and st and st ~= 'released' then return false end
  end
  return true
end

-- One node_free_gpus entry "<memory_free_mb>|<utilization>|<uuid>" -> memory, utilization and
-- the uuid's start, split by plain find (no pattern, no captures); and whether r can use it.
local function free_entry(r, v)
  local a = string.find(v, '|', 1, true)
  local b = string.find(v, '|', a + 1, true)
  local mem = tonumber(string.sub(v, 1, a - 1)) or 0
  local util = tonumber(string.sub(v, a + 1, b - 1)) or 0
  return mem, util, b + 1, mem >= r.minm and (r.maxm <= 0 or mem <= r.maxm) and util <= r.util
end

-- Qualifying free GPUs of one node for an exclusive request (one read: node_free_gpus).
local function node_candidates(r, node)
  local q = {}
  local h = redis.call('HGETALL', k_free(node))
  for i = 1, #h, 2 do
    local mem, util, at, ok = free_entry(r, h[i + 1])
    if ok and model_ok(r, node, h[i]) then
      local idx = h[i]
      q[#q + 1] = {idx = idx, mem = mem, util = util, uuid = string.sub(h[i + 1], at),
        pref = r.pref[idx] and 1 or 0}
    end
  end
  return q
end

-- The one GPU a single-GPU request without preferences gets on a node (the same choice as
-- node_candidates + rank_gpus, without a table per candidate): most free memory, then the
-- lowest utilization, then the lowest index. nil when none qualifies.
local function node_best1(r, node)
  local h = redis.call('HGETALL', k_free(node))
  local best, bmem, butil, bidx, bat
  for i = 1, #h, 2 do
    local mem, util, at, ok = free_entry(r, h[i + 1])
    if ok and model_ok(r, node, h[i]) then
      local idx = tonumber(h[i])
      if not best or mem > bmem or (mem == bmem and (util < butil or
          (util == butil and idx < bidx))) then
        best, bmem, butil, bidx, bat = i, mem, util, idx, at
      end
    end
  end
  if not best then return nil end
  return {idx = h[best], mem = bmem, util = butil, uuid = string.sub(h[best + 1], bat), pref = 0}
end

local function rank_gpus(a, b)
  if a.pref ~= b.pref then return a.pref > b.pref end
  if a.mem ~= b.mem then return a.mem > b.mem end
  if a.util ~= b.util then return a.util < b.util end
  return tonumber(a.idx) < tonumber(b.idx)
end

-- Exclusive placement: best fit over nodes by free-GPU count, preferred GPUs outranking it.
local function place_exclusive(r, blocked)
  local k = r.k
  if k == 1 and r.npref == 0 then
    -- the common case: the first live node (fewest free GPUs first) with a qualifying GPU
    local offset = 0
    while true do
      local batch = redis.call('ZRANGEBYSCORE', K_FREE, 1, '+inf', 'LIMIT', offset,
        offset == 0 and 8 or 64)
      if #batch == 0 then return nil end
      for _, node in ipairs(batch) do
        if not blocked[node] and node_ok(r, node) and node_alive(node) then
          local g = node_best1(r, node)
          if g then return node, {g} end
        end
      end
      offset = offset + #batch
    end
  end
  local want = math.min(r.npref, k)
  local best, bestq, bestp = nil, nil, -1
  local offset = 0
  while true do
    local batch = redis.call('ZRANGEBYSCORE', K_FREE, k, '+inf', 'LIMIT', offset,
      offset == 0 and 8 or 64)
    if #batch == 0 then break end
    for _, node in ipairs(batch) do
      if not blocked[node] and node_ok(r, node) and node_alive(node) then
        local q = node_candidates(r, node)
        if #q >= k then
          local p = 0
          for _, g in ipairs(q) do p = p + g.pref end
          if p > want then p = want end
          if p > bestp then
            best, bestq, bestp = node, q, p
            if p >= want then break end
          end
        end
      end
    end
    if best and bestp >= want then break end
    offset = offset + #batch
  end
  if not best then return nil end
  if k == 1 then
    local top = bestq[1]
    for i = 2, #bestq do
      if rank_gpus(bestq[i], top) then top = bestq[i] end
    end
    return best, {top}
  end
  table.sort(bestq, rank_gpus)
  local chosen = {}
  for i = 1, k do chosen[i] = bestq[i] end
  return best, chosen
end

-- Shared placement: the GPU whose reservable memory fits the request most tightly
-- (a preferred GPU first, when one qualifies).
local function place_shared(r, blocked)
  local hi = '+inf'
  if r.maxm > 0 then hi = r.maxm end
  local fallback, fnode = nil, nil
  local offset = 0
  while true do
    local batch = redis.call('ZRANGEBYSCORE', K_SHARED, r.minm, hi, 'WITHSCORES', 'LIMIT',
      offset, 128)
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      local node, idx = split_member(batch[i])
      if node and not blocked[node] and node_ok(r, node) and node_alive(node) then
        local g = redis.call('HMGET', k_gpu(node, idx), 'utilization', 'uuid', 'name')
        if (tonumber(g[1]) or 0) <= r.util and model_matches(r.pat, g[3]) then
          local cand = {idx = idx, mem = tonumber(batch[i + 1]), uuid = g[2] or ''}
          if r.npref == 0 or r.pref[idx] then return node, {cand} end
          if not fallback then fallback, fnode = cand, node end
        end
      end
    end
    offset = offset + #batch / 2
  end
  if fallback then return fnode, {fallback} end
  return nil
end

local function place(r, blocked)
  if r.sharing == 'shared' then return place_shared(r, blocked) end
  return place_exclusive(r, blocked)
end

-- Take one GPU for a request. An exclusive pick was free (in_free = 1, so in_busy = 0 and it
-- sits in shared_capacity): flip it directly instead of re-reading it.
local function take_gpu(r, node, idx)
  local gk = k_gpu(node, idx)
  if r.sharing == 'shared' then
    redis.call('HINCRBY', gk, 'shared_n', 1)
    redis.call('HINCRBY', gk, 'shared_mb', string.format('%d', r.minm))
    gpu_sync(node, idx)
  else
    redis.call('HSET', gk, 'excl', r.id, 'in_free', '0', 'in_busy', '1')
    redis.call('HDEL', k_free(node), idx)
    redis.call('ZINCRBY', K_FREE, '-1', node)
    meta_incr('gpus_free', -1)
    meta_incr('gpus_busy', 1)
    redis.call('ZREM', K_SHARED, node .. '|' .. idx)
  end
end

-- Give one GPU back from allocation id (the caller bumps the capacity version).
local function return_gpu(id, sharing, minm, node, idx)
  local gk = k_gpu(node, idx)
  if sharing == 'shared' then
    redis.call('HINCRBY', gk, 'shared_n', -1)
    redis.call('HINCRBY', gk, 'shared_mb', string.format('%d', -minm))
    gpu_sync(node, idx)
    return
  end
  local g = redis.call('HMGET', gk, 'excl', 'health', 'cordoned', 'lost', 'memory_free_mb',
    'shared_n', 'in_busy', 'utilization', 'uuid')
  if g[1] ~= id then return end
  if g[6] ~= '0' or g[7] ~= '1' then
    redis.call('HSET', gk, 'excl', '')
    gpu_sync(node, idx)
    return
  end
  local ok = g[2] == 'ok' and g[3] ~= '1' and g[4] ~= '1'
  redis.call('HSET', gk, 'excl', '', 'in_busy', '0', 'in_free', ok and '1' or '0')
  meta_incr('gpus_busy', -1)
  if ok then
    redis.call('HSET', k_free(node), idx, (g[5] or '0') .. '|' .. (g[8] or '0') .. '|' ..
      (g[9] or ''))
    redis.call('ZINCRBY', K_FREE, '1', node)
    meta_incr('gpus_free', 1)
    local cap = tonumber(g[5] or '0') or 0
    if cap < 0 then cap = 0 end
    redis.call('ZADD', K_SHARED, cap, node .. '|' .. idx)
  end
end

-- Give the chosen GPUs to the request. queued: it sits in the queue indexes; from_queue: the
-- client saw it queued (webhook). pending: an HSET of the record not sent yet (allocate's new
-- record), which the grant's fields join, so the record is written once. Returns the fields
-- it wrote.
local function grant(r, node, chosen, queued, from_queue, pending)
  local ids, uuids = {}, {}
  for i, g in ipairs(chosen) do
    take_gpu(r, node, g.idx)
    ids[i] = tonumber(g.idx)
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
    'allocated_at', NOW_S, 'expires_at', expires, 'wait_time_seconds', ftime(wait)}
  if pending then
    for i = 1, #out do pending[#pending + 1] = out[i] end
    redis.call(unpack(pending))
  else
    redis.call('HSET', k_req(r.id), unpack(out))
  end
  redis.call('ZADD', K_LEASES, score, r.id)
  redis.call('SADD', k_svc(r.svc), r.id)
  if queued then
    queue().dequeue(r.id, r.reserved, r.sharing, owner_bucket(r.owner, r.svc))
    notify(r.id, 'allocated')
  end
  local evid = event('allocated', r.id, r.svc, {'node', node, 'gpu_ids', ids_json,
    'gpu_uuids', uuids_json})
  stat('alloc|' .. svc_label(r.svc) .. '|allocated')
  if from_queue then
    stat('sched|from_queue')
    stat_wait(wait)
    outbox('allocated', r.id, evid, r.hook, nil, true,
      {expires_at = expires, lease_seconds = fnum(r.lease)})
  else
    stat('sched|immediate')
  end
  return out
end

-- End a queued request (cancelled | timed_out) without looking at its dependents. reason and
-- cause: set when the engine cancels it because dependency `cause` failed. Returns whether
-- requests wait on it with depends_on_mode ok.
local function end_queued(id, status, reason, cause)
  local rk = k_req(id)
  local f = redis.call('HMGET', rk, 'service_name', 'webhook_url', 'webhook_events',
    'reserved_node', 'sharing', 'ok_dependents', 'owner')
  queue().dequeue(id, f[4], f[5], owner_bucket(f[7], f[1]))
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
  stat('alloc|' .. svc_label(f[1]) .. '|' .. status)
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

-- End a live allocation (released | expired | lost): give its GPUs back. rec: the record as a
-- table when the caller already read it (release); it is updated to match what is written.
-- A lost allocation (its node was forgotten) is always notified when it has a webhook_url.
local function finish_alloc(id, status, rec)
  local rk = k_req(id)
  local f
  if rec then
    f = {rec.node, rec.gpu_ids, rec.sharing, rec.min_memory_mb, rec.service_name,
      rec.webhook_url, rec.webhook_events, rec.ok_dependents}
  else
    f = redis.call('HMGET', rk, 'node', 'gpu_ids', 'sharing', 'min_memory_mb',
      'service_name', 'webhook_url', 'webhook_events', 'ok_dependents')
  end
  local node, sharing, minm, svc = f[1], f[3], tonumber(f[4]) or 0, f[5] or ''
  for _, i in ipairs(cjson.decode(f[2] or '[]')) do
    return_gpu(id, sharing, minm, node, string.format('%d', i))
  end
  local now = NOW_S
  if status == 'released' then
    redis.call('HSET', rk, 'status', status, 'released_at', now, 'ended_at', now)
    if rec then rec.released_at = now end
  else
    redis.call('HSET', rk, 'status', status, 'ended_at', now)
  end
  if rec then rec.status, rec.ended_at = status, now end
  redis.call('EXPIRE', rk, HIST_TTL_S)
  redis.call('ZREM', K_LEASES, id)
  redis.call('SREM', k_svc(svc), id)
  bump_capacity()
  notify(id, status)
  local evid = event(status, id, svc, {'node', node or '', 'gpu_ids', f[2] or '[]'})
  stat('alloc|' .. svc_label(svc) .. '|' .. status)
  outbox(status, id, evid, f[6], f[7], status == 'lost')
  if f[8] == '1' then
    if status == 'released' then
      redis.call('DEL', k_deps(id))  -- its ok-dependents may run now; nothing left to cancel
    else
      fail_dependents(id)
    end
  end
end

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

--[[
  The queue's functions (dequeue, enqueue, the schedule pass and its helpers) are built on first
  use: Redis 6.2 creates every local function of a script on every call, and the usual allocate
  or release (an empty queue) needs none of them.
]]
queue = function()
  if queue_fns then return queue_fns end
  -- Remove a request from every queue index; drop its reservation (that frees a node for others).
  -- Inside a pass (dq_ids set) the ids are collected and leave the indexes together, one call
  -- per index, in dequeue_flush: the pass flushes before it reads the queue again.
  local dq_ids, dq_owners = nil, nil
  local function dequeue(id, reserved, sharing, bucket)
    if not bucket then
      local f = redis.call('HMGET', k_req(id), 'owner', 'service_name')
      bucket = owner_bucket(f[1], f[2])
    end
    if dq_ids then
      dq_ids[#dq_ids + 1] = id
      dq_owners[bucket] = (dq_owners[bucket] or 0) - 1
    else
      owner_count(bucket, -1)
      redis.call('ZREM', K_QUEUE, id)
      redis.call('HDEL', K_QSHAPE, id)
      if sharing ~= 'shared' then redis.call('ZREM', K_QDX, id) end
      if sharing ~= 'exclusive' then redis.call('ZREM', K_QDS, id) end
      redis.call('ZREM', K_QDEAD, id)
      redis.call('ZREM', K_QUNRES, id)
    end
    if reserved and reserved ~= '' then
      if redis.call('HGET', K_RES, reserved) == id then
        redis.call('HDEL', K_RES, reserved)
        bump_capacity()
      end
    end
  end

  local function dequeue_flush()
    if dq_ids and #dq_ids > 0 then
      for _, key in ipairs({K_QUEUE, K_QDX, K_QDS, K_QDEAD, K_QUNRES}) do
        redis.call('ZREM', key, unpack(dq_ids))
      end
      redis.call('HDEL', K_QSHAPE, unpack(dq_ids))
      for bucket, n in pairs(dq_owners) do owner_count(bucket, n) end
    end
    dq_owners = {}
  end

  -- Queue rank score, lowest first. With aging, effective priority p + AGING * (now - s) orders
  -- like p - AGING * s, so the score AGING * s - p never has to change. s is made strictly
  -- increasing (10 us apart at least) so equal times still queue FIFO, and is taken relative
  -- to 1.7e9 s to keep the double's precision for that step.
  local function enqueue(r, queue_timeout)
    local score
    if AGING > 0 then
      local s = r.submitted
      local last = tonumber(redis.call('HGET', K_META, 'last_submit') or '0') or 0
      if s <= last then s = last + 0.00001 end
      redis.call('HSET', K_META, 'last_submit', fnum(s))
      score = AGING * (s - 1700000000) - r.priority
    else
      score = -r.priority * 1e12 + redis.call('HINCRBY', K_META, 'seq', 1)
    end
    redis.call('ZADD', K_QUEUE, fnum(score), r.id)
    redis.call('HSET', K_QSHAPE, r.id, r.sharing .. '|' .. r.k .. '|' .. r.minm .. '|' .. r.maxm ..
      '|' .. r.util .. '|' .. r.pref_raw .. '|' .. r.pat .. '|' .. r.nodes_raw)
    if r.sharing == 'shared' then
      redis.call('ZADD', K_QDS, r.minm, r.id)
    else
      redis.call('ZADD', K_QDX, r.k, r.id)
    end
    redis.call('ZADD', K_QDEAD, ftime(r.submitted + queue_timeout), r.id)
    redis.call('ZADD', K_QUNRES, ftime(r.submitted), r.id)
    owner_count(owner_bucket(r.owner, r.svc), 1)
  end

  -- Does queued request a rank ahead of queued request b?
  local function ranks_before(a, b)
    local sa = redis.call('ZSCORE', K_QUEUE, a)
    local sb = redis.call('ZSCORE', K_QUEUE, b)
    if not sa or not sb then return false end
    sa, sb = tonumber(sa), tonumber(sb)
    if sa ~= sb then return sa < sb end
    return a < b
  end

  local function low_score(key)
    local t = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #t == 0 then return nil end
    return tonumber(t[2])
  end

  -- Cheap test: no queued demand can fit the best free capacity anywhere.
  local function nothing_fits()
    local minx, mins = low_score(K_QDX), low_score(K_QDS)
    local xfit = minx ~= nil and minx <= top_score(K_FREE)
    local sfit = mins ~= nil and mins <= top_score(K_SHARED)
    return not xfit and not sfit
  end

  -- Reserve the node where a long-waiting request will fit soonest: the k-th earliest time a
  -- GPU that could hold it becomes free (now for free ones, the holder's lease end otherwise).
  local function reserve(r, blocked)
    local best, best_t, best_size = nil, nil, nil
    local sizes = redis.call('ZRANGEBYSCORE', K_SIZES, r.k, '+inf', 'WITHSCORES')
    for i = 1, #sizes, 2 do
      local node, size = sizes[i], tonumber(sizes[i + 1])
      if not blocked[node] and node_ok(r, node) and node_alive(node) and
          not redis.call('HGET', K_RES, node) then
        local times = {}
        for _, idx in ipairs(node_indexes(node)) do
          local g = redis.call('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
            'memory_total_mb', 'excl', 'shared_n', 'name')
          if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and (tonumber(g[4]) or 0) >= r.minm
              and model_matches(r.pat, g[7]) then
            local t = NOW
            if g[5] and g[5] ~= '' then
              t = tonumber(redis.call('ZSCORE', K_LEASES, g[5]) or '1e18') or 1e18
            elseif (tonumber(g[6] or '0') or 0) > 0 and r.sharing ~= 'shared' then
              t = 1e18
            end
            times[#times + 1] = t
          end
        end
        if #times >= r.k then
          table.sort(times)
          local t = times[r.k]
          if best == nil or t < best_t or (t == best_t and size < best_size) then
            best, best_t, best_size = node, t, size
          end
        end
      end
    end
    if best then
      redis.call('ZREM', K_QUNRES, r.id)
      redis.call('HSET', K_RES, best, r.id)
      redis.call('HSET', k_req(r.id), 'reserved_node', best)
      event('reserved', r.id, r.svc, {'node', best})
      return best
    end
    -- no node can take it now: try again after another reservation_after
    redis.call('ZADD', K_QUNRES, NOW_S, r.id)
    return ''
  end

  --[[
    The schedule pass. Walks the queue in rank order (priority desc, FIFO; aging is in the score)
    and grants what fits. Guarantee: a grant never overtakes a higher-ranked waiting request that
    fits, because higher-ranked ones were tried first against at least the capacity now left.

    Cost control:
    * meta.capver counts capacity appearing (GPU freed, node back, dependency finished,
      reservation dropped); meta.passver is capver at the last full pass. Equal: every queued
      request already failed against at least today's capacity, so only new_id is tried.
      force (the periodic safety-net pass) walks regardless.
    * nothing_fits(): smallest queued demand vs best free capacity, O(log n).
    * in the walk, a demand shape that failed is not tried again (capacity only shrinks).
  ]]
  local function schedule_inner(new_id, force)
    local granted = {}
    if redis.call('ZCARD', K_QUEUE) == 0 then return granted end
    local capver = redis.call('HGET', K_META, 'capver') or '0'
    local full = force or capver ~= (redis.call('HGET', K_META, 'passver') or '')
    if not full and RES_AFTER >= 0 and POLICY ~= 'strict_fifo' then
      local due = low_score(K_QUNRES)
      if due and due <= NOW - RES_AFTER then full = true end
    end
    if not full then
      if new_id == nil then
        stat('sched|passes_skipped')
        return granted
      end
      if POLICY == 'strict_fifo' and redis.call('ZRANK', K_QUEUE, new_id) ~= 0 then
        return granted
      end
      local r = load_req(new_id)
      if not r or r.status ~= 'queued' or not deps_done(r) then return granted end
      local blocked = {}
      local res = redis.call('HGETALL', K_RES)
      for i = 1, #res, 2 do
        if ranks_before(res[i + 1], new_id) then blocked[res[i]] = true end
      end
      local node, chosen = place(r, blocked)
      if node then
        grant(r, node, chosen, true, false)
        granted[1] = new_id
      end
      return granted
    end
    redis.call('HSET', K_META, 'passver', capver)
    stat('sched|passes')
    if nothing_fits() then return granted end
    local blocked, failed = {}, {}
    local maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
    local may_reserve = RES_AFTER >= 0 and POLICY ~= 'strict_fifo'
    local new_reservations = 0
    local reserved_by, due, possible = {}, {}, {}
    local res = redis.call('HGETALL', K_RES)
    for i = 1, #res, 2 do reserved_by[res[i + 1]] = res[i] end
    if may_reserve then
      local waited = redis.call('ZRANGEBYSCORE', K_QUNRES, '-inf', ftime(NOW - RES_AFTER))
      for _, id in ipairs(waited) do due[id] = true end
    end
    local offset = 0
    while true do
      local ids = redis.call('ZRANGE', K_QUEUE, offset, offset + 499)
      if #ids == 0 then break end
      local removed = 0
      local shapes = redis.call('HMGET', K_QSHAPE, unpack(ids))
      for i, id in ipairs(ids) do
        -- the shape first (500 per read): a shape that already failed in this pass, or that
        -- the best free capacity cannot hold, is skipped without reading the request
        local sig = shapes[i]
        if sig then
          local placed = false
          local ok = possible[sig]
          if ok == nil then
            local sharing, k, minm = string.match(sig, '^([^|]*)|([^|]*)|([^|]*)|')
            if sharing == 'shared' then
              ok = tonumber(minm) <= maxshared
            else
              ok = tonumber(k) <= maxfree
            end
            possible[sig] = ok
          end
          if ok and not failed[sig] then
            local r = load_req(id)
            if r and deps_done(r) then
              local node, chosen = place(r, blocked)
              if node then
                grant(r, node, chosen, true, id ~= new_id)
                granted[#granted + 1] = id
                placed = true
                removed = removed + 1
                -- maxfree and maxshared are not re-read: capacity only shrinks in a pass, so
                -- a shape judged possible that no longer fits fails once in place()
              else
                failed[sig] = true
              end
            end
          end
          if not placed then
            if POLICY == 'strict_fifo' then return granted end
            local rn = reserved_by[id]
            if not rn and due[id] and may_reserve and new_reservations < 4 then
              rn = reserve(load_req(id), blocked)
              if rn == '' then may_reserve = false else new_reservations = new_reservations + 1 end
            end
            if rn and rn ~= '' then blocked[rn] = true end
          end
        end
      end
      dequeue_flush()
      dq_ids = {}
      if removed > 0 then
        if nothing_fits() then break end
        maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
        possible = {}
      end
      offset = offset + #ids - removed
    end
    return granted
  end

  -- One pass: dequeues are collected (see dequeue) and flushed however the pass ends.
  local function pass(new_id, force)
    dq_ids, dq_owners = {}, {}
    local granted = schedule_inner(new_id, force)
    dequeue_flush()
    dq_ids, dq_owners = nil, nil
    return granted
  end
  queue_fns = {dequeue = dequeue, enqueue = enqueue, pass = pass}
  return queue_fns
end

local function schedule(new_id, force)
  -- an empty queue (the usual case for a release) has nothing to pass over: one ZCARD
  if redis.call('ZCARD', K_QUEUE) == 0 then return {} end
  stat_buf, meta_buf = {}, {}
  local granted = queue().pass(new_id, force)
  stat_flush()
  return granted
end

-- A record as one JSON object string (one reply element instead of fifty).
local function record(id)
  local h = redis.call('HGETALL', k_req(id))
  local t = {}
  for i = 1, #h, 2 do t[h[i]] = h[i + 1] end
  return cjson.encode(t)
end

local function records(ids)
  local out = {}
  for i, id in ipairs(ids) do out[i] = record(id) end
  return out
end
