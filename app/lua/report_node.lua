--[[
  report_node: the monitor's heartbeat for one node and the telemetry of all its GPUs.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] node   ARGV[A+2] backend   ARGV[A+3] host
  ARGV[A+4] JSON list of GPUs, each a flat object of string fields including index, health,
            memory_total_mb and memory_free_mb (the telemetry the monitor owns).
  Returns: the records granted by the pass that follows (capacity may have appeared).
  Guarantees: a GPU known for the node but missing from the report turns failed and lost (not
  schedulable) while its allocations stay; it comes back when reported again. Events
  gpu_unhealthy / gpu_recovered mark health leaving or reaching "ok"; when a held GPU leaves
  "ok" or turns lost, each holder gets one allocation_unhealthy event and a gpu_unhealthy
  webhook naming those GPUs (includes/nodes.lua). GPUs first reported by a cordoned node arrive
  cordoned. Any report that could let a waiting request fit (a GPU back, less utilization, changed free memory on a GPU
  without an exclusive holder, a node whose heartbeat had lapsed) bumps the capacity version,
  so the pass that follows rescans the queue.
]]
-- @include prelude
-- @include nodes
local node, backend, host = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local gpus = cjson.decode(ARGV[A + 4])
local nk = k_node(node)

local prev_hb = rcall('ZSCORE', K_NODES, node)
if prev_hb and tonumber(prev_hb) < NOW - HB_TIMEOUT then bump_capacity() end
rcall('ZADD', K_NODES, NOW_S, node)
alive_cache[node] = true

local known = {}
local list = {}
for _, idx in ipairs(node_indexes(node)) do
  known[idx] = true
  list[#list + 1] = idx
end

local function was_ok(h)
  return h[1] == 'ok' and h[2] ~= '1'
end

-- allocations holding a GPU that just turned unhealthy: id -> {{index, health}...}
local affected, affected_ids = {}, {}
local function held_turned_bad(idx, excl, shared_n, health)
  local holders = {}
  if excl and excl ~= '' then holders[1] = excl end
  if (tonumber(shared_n or '0') or 0) > 0 then
    for _, id in ipairs(allocs_on(node, idx)) do
      if id ~= excl then holders[#holders + 1] = id end
    end
  end
  for _, id in ipairs(holders) do
    if not affected[id] then
      affected[id] = {}
      affected_ids[#affected_ids + 1] = id
    end
    local list = affected[id]
    list[#list + 1] = {index = tonumber(idx), health = health}
  end
end
local node_cordoned = rcall('HGET', nk, 'cordoned') == '1' and '1' or '0'

local seen = {}
for _, g in ipairs(gpus) do
  local idx = g.index
  seen[idx] = true
  local gk = k_gpu(node, idx)
  local prev = rcall('HMGET', gk, 'health', 'lost', 'utilization', 'memory_free_mb', 'excl',
    'shared_n')
  if not known[idx] then
    known[idx] = true
    list[#list + 1] = idx
    -- the engine's fields first, then the readings a release reads (its HMGET of the GPU): a
    -- small hash is a list searched from its head, and a grant and a release read and write
    -- these (the HSET below writes them again, in place)
    local first = {'HSET', gk, 'excl', '', 'in_free', '0', 'in_busy', '0', 'shared_n', '0',
      'shared_mb', '0', 'cordoned', node_cordoned, 'lost', '0'}
    if g.health ~= nil then first[#first + 1], first[#first + 2] = 'health', g.health end
    if g.memory_free_mb ~= nil then
      first[#first + 1], first[#first + 2] = 'memory_free_mb', g.memory_free_mb
    end
    if g.utilization ~= nil then
      first[#first + 1], first[#first + 2] = 'utilization', g.utilization
    end
    if g.uuid ~= nil then first[#first + 1], first[#first + 2] = 'uuid', g.uuid end
    rcall(unpack(first))
    meta_incr('gpus_out', 1) -- neither free nor allocated until gpu_sync below places it
  end
  local args = {'HSET', gk, 'node', node, 'lost', '0', 'updated_at', NOW_S}
  for key, value in pairs(g) do
    args[#args + 1] = key
    args[#args + 1] = value
  end
  rcall(unpack(args))
  rcall('ZADD', K_GPUS, tonumber(g.memory_total_mb) or 0, node .. '|' .. idx)
  if prev[1] then
    -- telemetry that can make a waiting request fit (less busy; other free memory, which
    -- max_memory_mb also bounds) is new capacity for the next pass
    if (prev[5] or '') == '' and ((tonumber(g.utilization) or 0) < (tonumber(prev[3]) or 0)
        or (tonumber(g.memory_free_mb) or 0) ~= (tonumber(prev[4]) or 0)) then
      bump_capacity()
    end
    local now_ok = g.health == 'ok'
    if was_ok(prev) and not now_ok then
      event('gpu_unhealthy', '', '', {'node', node, 'gpu_index', idx, 'health', g.health})
      held_turned_bad(idx, prev[5], prev[6], g.health)
    elseif not was_ok(prev) and now_ok then
      event('gpu_recovered', '', '', {'node', node, 'gpu_index', idx, 'health', g.health})
    end
  end
  gpu_sync(node, idx)
end

for _, idx in ipairs(list) do
  if not seen[idx] then
    local gk = k_gpu(node, idx)
    local prev = rcall('HMGET', gk, 'health', 'lost', 'excl', 'shared_n')
    if prev[2] ~= '1' then
      rcall('HSET', gk, 'health', 'failed', 'lost', '1', 'updated_at', NOW_S)
      if was_ok(prev) then
        event('gpu_unhealthy', '', '', {'node', node, 'gpu_index', idx, 'health', 'failed',
          'reason', 'lost'})
      end
      held_turned_bad(idx, prev[3], prev[4], 'lost')
      gpu_sync(node, idx)
    end
  end
end

notify_unhealthy(node, affected, affected_ids)

table.sort(list, function(a, b) return tonumber(a) < tonumber(b) end)
rcall('HSET', nk, 'name', node, 'heartbeat', NOW_S, 'silence_told', '0',
  'gpu_count', #list, 'backend', backend, 'host', host, 'indexes', table.concat(list, ','))
rcall('ZADD', K_SIZES, #list, node)
if rcall('ZSCORE', K_FREE, node) == false then rcall('ZADD', K_FREE, 0, node) end
rcall('HSET', K_META, 'max_node_gpus', top_score(K_SIZES), 'max_gpu_mb', top_score(K_GPUS),
  'gpus_total', rcall('ZCARD', K_GPUS))
return records(schedule(nil))
