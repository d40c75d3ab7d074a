--[[
  indexes: node liveness and GPU indexes, and gpu_sync, which puts one GPU back
  in the right indexes (nodes_free, the node's node_free_gpus, shared capacity, meta
  gpus_out) after any change to it.
  Guarantees: after gpu_sync the indexes agree with the GPU hash.
]]

local function split_member(m) return string.match(m, '^(.*)|([^|]*)$') end

local alive_cache = {}
local function node_alive(node)
  local v = alive_cache[node]
  if v == nil then
    local hb = rcall('ZSCORE', K_NODES, node)
    v = (hb and num(hb) >= NOW - HB_TIMEOUT) and true or false
    alive_cache[node] = v
  end
  return v
end

local index_cache = {}
local function node_indexes(node)
  local v = index_cache[node]
  if v == nil then
    v = {}
    local s = rcall('HGET', k_node(node), 'indexes')
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
  local f = rcall('HMGET', gk, 'excl', 'shared_n', 'health', 'cordoned', 'lost',
    'memory_free_mb', 'shared_mb', 'in_free', 'in_busy', 'utilization', 'uuid',
    'memory_total_mb')
  local excl = f[1] or ''
  local sn = tonumber(f[2] or '0') or 0
  local ok = f[3] == 'ok' and f[4] ~= '1' and f[5] ~= '1'
  local free = ok and excl == '' and sn == 0
  local busy = excl ~= '' or sn > 0
  if free ~= (f[8] == '1') then
    rcall('ZINCRBY', K_FREE, free and 1 or -1, node)
    rcall('HSET', gk, 'in_free', free and '1' or '0')
    if free then bump_capacity() end
  end
  if free then
    rcall('HSET', k_free(node), idx, (f[6] or '0') .. '|' .. (f[10] or '0') .. '|' ..
      (f[11] or ''))
  elseif f[8] == '1' then
    rcall('HDEL', k_free(node), idx)
  end
  if busy ~= (f[9] == '1') then
    rcall('HSET', gk, 'in_busy', busy and '1' or '0')
  end
  -- neither free nor allocated (unusable and unheld): meta.gpus_out
  local out, was_out = not free and not busy, f[8] ~= '1' and f[9] ~= '1'
  if out ~= was_out then meta_incr('gpus_out', out and 1 or -1) end
  local member = node .. '|' .. idx
  local old = rcall('ZSCORE', K_SHARED, member)
  if ok and excl == '' and sn < MAX_SHARED then
    -- room for shared requests (none once MAX_SHARED shared allocations hold it): total - max(reserved, used), i.e. what is neither reserved
    -- nor in use (a running shared job's memory shows in the reading and in its reservation;
    -- counting both would halve packing on real GPUs). See docs/engine.md, Placement.
    local free_mb = tonumber(f[6] or '0') or 0
    local cap = (tonumber(f[12] or '0') or 0) - (tonumber(f[7] or '0') or 0)
    if free_mb < cap then cap = free_mb end
    if cap < 0 then cap = 0 end
    if old == false or tonumber(old) ~= cap then
      rcall('ZADD', K_SHARED, cap, member)
      if old == false or tonumber(old) < cap then bump_capacity() end
    end
  elseif old then
    rcall('ZREM', K_SHARED, member)
  end
end
