--[[
  snapshot: one consistent page of the requests (listings, dashboards, the invariant tests).
  The GPUs' telemetry and the nodes are read by Engine.snapshot with plain pipelined reads, one
  short command per hash, so a large fleet never blocks Redis for the length of one long
  script. What must agree with the page, which allocation holds each GPU, is read here from
  the live allocations (one short read each; there are at most as many as GPUs, usually far
  fewer), and Engine.snapshot fills each GPU's holder fields from it.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] what: "allocations" (the live allocations only, no queue), anything else:
            allocations and queue
  ARGV[A+2] limit: most records on this page ("" = all)
  ARGV[A+3] cursor: "" = from the start, else the page's resume point as returned in `next`:
            "a|<score>|<id>" (after that allocation) or "q|<score>|<id>" (after that queued
            request)
  ARGV[A+4] wait: how many queued requests, from the head, app/waiting.py simulates ("" or 0 =
            none: no `wait` in the answer)
  Returns: JSON {now, held: [id, node, gpu_ids, sharing, min_memory_mb, ...] for every live
  allocation, wait (with ARGV[A+4] > 0): {held: [{id, node, gpu_ids, sharing, min_memory_mb,
  expires_at, owner, service_name, tenant, lease_seconds, priority}] every live allocation,
  queue: [the first `wait` queued requests with the fields placement needs, and
  unreserved_since: the score reservation_after counts from], deps: {id: status or false} for their
  dependencies that are neither live nor among them, beyond: [the holders of reservations ranked
  after those, as queue's, with their position], holds: {node: holder} (preemption holds)},
  allocations: [...], queue: [...], allocations_total, queue_depth,
  queue_start (0-based rank of the page's first queued request), next ("" when this page ends
  the listing)}. Records are compact: one JSON object each, without workload_data (the
  listing's cost must not grow with what clients attach).
  Pages walk the live allocations in lease order, then the queue in rank order. Cost per call:
  O(limit x log n), whatever the queue's length.
]]
-- @include prelude
local what, limit, cursor = ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3]
local out = {now = NOW, held = {}, allocations = {}, queue = {}, allocations_total = 0,
  queue_depth = 0, queue_start = 0, next = ''}
local held = out.held
for _, id in ipairs(rcall('ZRANGE', K_LEASES, 0, -1)) do
  local f = rcall('HMGET', k_req(id), 'node', 'gpu_ids', 'sharing', 'min_memory_mb')
  local n = #held
  held[n + 1], held[n + 2], held[n + 3], held[n + 4], held[n + 5] =
    id, f[1] or '', f[2] or '[]', f[3] or REC_DEFAULTS.sharing, f[4] or '0'
end

local function compact(id)
  local h = rcall('HGETALL', k_req(id))
  local t = {}
  for i = 1, #h, 2 do
    if h[i] ~= 'workload_data' then t[h[i]] = h[i + 1] end
  end
  return cjson.encode(t)
end

-- where a page starts in key: after the cursor's id, or (when that id has left the list since)
-- at the first member scored at or after it (a record may then show twice, none is skipped)
local function start_of(key, score, id)
  local rank = rcall('ZRANK', key, id)
  if rank then return rank + 1 end
  return rcall('ZCOUNT', key, '-inf', '(' .. score)
end

-- one list's part of the page: up to room records from rank start; the last one's cursor
local function take(key, tag, start, room, into)
  if room == nil then room = -1 end
  if room == 0 then return '' end
  local stop = room < 0 and -1 or start + room - 1
  local ids = rcall('ZRANGE', key, start, stop, 'WITHSCORES')
  for i = 1, #ids, 2 do into[#into + 1] = compact(ids[i]) end
  if #ids == 0 then return '' end
  -- the score as it round-trips, without the '+' that Redis 7+ and Valkey put in an exponent
  -- (1.666616666666667e+5): a client pasting `next` into a URL would send it as a space
  local score = string.format('%.17g', tonumber(ids[#ids])):gsub('e%+', 'e')
  return tag .. '|' .. score .. '|' .. ids[#ids - 1]
end

out.allocations_total = rcall('ZCARD', K_LEASES)
out.queue_depth = rcall('ZCARD', K_QUEUE)
local list, score, id = string.match(cursor, '^([aq])|([^|]*)|(.*)$')
local a_start, q_start = 0, 0
if list == 'a' then
  a_start = start_of(K_LEASES, score, id)
elseif list == 'q' then
  a_start, q_start = nil, start_of(K_QUEUE, score, id)
end
local room = limit
local last = ''
if a_start then
  last = take(K_LEASES, 'a', a_start, room, out.allocations)
  if room then room = room - #out.allocations end
end
if what ~= 'allocations' and (room == nil or room > 0) then
  out.queue_start = q_start
  local q_last = take(K_QUEUE, 'q', q_start, room, out.queue)
  if q_last ~= '' then last = q_last end
  if room then room = room - #out.queue end
end
-- more to come only when the page is full and something lies beyond it
if room == 0 and last ~= '' then
  local beyond
  if what ~= 'allocations' then
    local l, s, i = string.match(last, '^([aq])|([^|]*)|(.*)$')
    if l == 'a' then
      beyond = start_of(K_LEASES, s, i) < out.allocations_total or out.queue_depth > 0
    else
      beyond = start_of(K_QUEUE, s, i) < out.queue_depth
    end
  else
    local _, s, i = string.match(last, '^([aq])|([^|]*)|(.*)$')
    beyond = start_of(K_LEASES, s, i) < out.allocations_total
  end
  if beyond then out.next = last end
end

-- the consistent read app/waiting.py simulates: O(live allocations + wait) short reads
local wait_n = tonumber(ARGV[A + 4] or '') or 0
if wait_n > 0 then
  local wait = {held = {}, queue = {}, deps = {}}
  local known = {}
  local AF = {'node', 'gpu_ids', 'sharing', 'min_memory_mb', 'expires_at', 'owner',
    'service_name', 'tenant', 'lease_seconds', 'priority'}
  for i = 1, #held, 5 do
    local id = held[i]
    local f = rcall('HMGET', k_req(id), unpack(AF))
    local a = {id = id}
    for j, name in ipairs(AF) do a[name] = f[j] or REC_DEFAULTS[name] or '' end
    wait.held[#wait.held + 1] = a
    known[id] = true
  end
  local QF = {'sharing', 'required_gpus', 'min_memory_mb', 'max_memory_mb', 'max_utilization',
    'preferred_gpus', 'nodes', 'gpu_model', 'lease_seconds', 'depends_on', 'reserved_node',
    'owner', 'service_name', 'tenant', 'submitted_at', 'queue_timeout_seconds', 'priority',
    'status'}
  local ids = rcall('ZRANGE', K_QUEUE, 0, wait_n - 1)
  for _, id in ipairs(ids) do known[id] = true end
  local function queued(id)
    local f = rcall('HMGET', k_req(id), unpack(QF))
    local q = {id = id}
    for j, name in ipairs(QF) do q[name] = f[j] or REC_DEFAULTS[name] or '' end
    -- since when it waits for a reservation (reservation_after counts from there)
    q.unreserved_since = rcall('ZSCORE', K_QUNRES, id) or ''
    if q.depends_on ~= '' and q.depends_on ~= '[]' then
      local ok, deps = pcall(cjson.decode, q.depends_on)
      if ok and type(deps) == 'table' then
        for _, d in ipairs(deps) do
          if type(d) == 'string' and not known[d] then
            wait.deps[d] = rcall('HGET', k_req(d), 'status') or false
            known[d] = true
          end
        end
      end
    end
    return q
  end
  for _, id in ipairs(ids) do wait.queue[#wait.queue + 1] = queued(id) end
  -- the holders of reservations ranked beyond that head (a reserved node is held back from
  -- requests ahead of its holder too, with fair share or a preemption's hold): at most one
  -- per node, each with its place in the queue; and the preemption holds (node -> holder)
  wait.beyond, wait.holds = {}, {}
  -- (HLEN first: most reads find neither reservations nor holds)
  local res = rcall('HLEN', K_RES) > 0 and rcall('HGETALL', K_RES) or {}
  for i = 1, #res, 2 do
    local id = res[i + 1]
    if not known[id] then
      local rank = rcall('ZRANK', K_QUEUE, id)
      if rank then
        known[id] = true
        local q = queued(id)
        q.position = rank + 1
        wait.beyond[#wait.beyond + 1] = q
      end
    end
  end
  local hk = k_holds()
  local holds = rcall('HLEN', hk) > 0 and rcall('HGETALL', hk) or {}
  for i = 1, #holds, 2 do wait.holds[holds[i]] = holds[i + 1] end
  out.wait = wait
end
return cjson.encode(out)
