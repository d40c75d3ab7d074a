--[[
  placement: a request as the scheduler sees it, and where it may go:
  node and model filters, dependencies, best-fit exclusive and tightest-fit shared placement,
  taking and giving back one GPU.
  Guarantees: a placement only returns GPUs that are free (exclusive) or have the reservable
  memory (shared) at the moment it is made.
]]

-- A request as the scheduler sees it. f: its record's fields by name (REQ_FIELDS at least),
-- with REC_DEFAULTS_MT as metatable, so a field at its default (not stored) reads as it.
-- REQ_FIELDS and REC_DEFAULTS are generated from app/record.py when the library is built.
-- one shared empty table, read only: the preferences of a request without any, the nodes held
-- back from allocate's own placement
local EMPTY = {}
local function req_from(id, f, submitted)
  -- num's memo read first (a hit, the usual case, is one table read instead of a call)
  local m = num_memo
  local k, minm, maxm = f.required_gpus, f.min_memory_mb, f.max_memory_mb
  local util, prio = f.max_utilization, f.priority
  local r = {id = id, svc = f.service_name, sharing = f.sharing, k = m[k] or num(k),
    minm = m[minm] or num(minm), maxm = m[maxm] or num(maxm),
    util = m[util] or num(util), pref_raw = f.preferred_gpus, deps_raw = f.depends_on,
    submitted = submitted or tonumber(f.submitted_at), hook = f.webhook_url or '',
    lease = lease_secs(f.lease_seconds),
    priority = m[prio] or num(prio), reserved = f.reserved_node or '', status = f.status,
    owner = f.owner or '', pat = f.gpu_pattern or '', nodes_raw = f.nodes,
    mode = f.depends_on_mode, tenant = f.tenant or ''}
  -- gpu_model as an anchored Lua pattern on the lower-cased GPU name ('' = any model) and the
  -- nodes it may use (nil = any node): both set by the client, checked in placement
  if r.nodes_raw ~= '[]' then
    r.nodes = {}
    for _, n in ipairs(cjson.decode(r.nodes_raw)) do r.nodes[n] = true end
  end
  r.pref = EMPTY
  r.npref = 0
  if r.pref_raw ~= '[]' then
    r.pref = {}
    for _, p in ipairs(cjson.decode(r.pref_raw)) do
      local key = string.format('%d', p)
      if not r.pref[key] then r.pref[key] = true; r.npref = r.npref + 1 end
    end
  end
  return r
end

local function load_req(id)
  local v = rcall('HMGET', k_req(id), unpack(REQ_FIELDS))
  local f = setmetatable({}, REC_DEFAULTS_MT)
  for i, name in ipairs(REQ_FIELDS) do
    if v[i] then f[name] = v[i] end
  end
  if not f.status then return nil end
  return req_from(id, f)
end

-- May the request use this node (its nodes list), and this GPU (its gpu_model)?
local function node_ok(r, node) return r.nodes == nil or r.nodes[node] == true end

local function model_matches(pat, name)
  return pat == '' or string.find(string.lower(name or ''), pat) ~= nil
end

local function model_ok(r, node, idx)
  if r.pat == '' then return true end
  return model_matches(r.pat, rcall('HGET', k_gpu(node, idx), 'name'))
end

-- True when nothing the request depends on is still queued or live. depends_on_mode ok also
-- needs each to have been released (a record gone with its history was: a dependency that
-- ended otherwise cancels its ok-dependents at once, see fail_dependents).
local function deps_done(r)
  if r.deps_raw == '[]' then return true end
  local ok_mode = r.mode == 'ok'
  for _, dep in ipairs(cjson.decode(r.deps_raw)) do
    local st = rcall('HGET', k_req(dep), 'status')
    if st == 'queued' or st == 'allocated' or st == 'preempting' then return false end
    if ok_mode and st and st ~= 'released' then return false end
  end
  return true
end

-- A GPU's key, its node's node_free_gpus key and its shared_capacity member (node|idx), built
-- once per prefix, node and index: the three concatenations cost each take or return of a GPU
-- ~2.5k instructions. Bounded like num's memo (MEMO_MAX nodes).
local gpu_names
do
  local memo, memo_p, n = {}, nil, 0
  gpu_names = function(node, idx)
    if memo_p ~= P then memo, memo_p, n = {}, P, 0 end
    local m = memo[node]
    if not m then
      if n >= MEMO_MAX then memo, n = {}, 0 end
      m = {free = k_free(node)}
      memo[node], n = m, n + 1
    end
    local g = m[idx]
    if not g then
      g = {k_gpu(node, idx), node .. '|' .. idx}
      m[idx] = g
    end
    return g[1], m.free, g[2]
  end
end

-- One node_free_gpus entry "<memory_free_mb>|<utilization>|<uuid>" -> memory, utilization and
-- the uuid, split by plain find (no pattern, no captures); and whether r can use it. Parsed
-- entries are memoized (the same entries come back until a GPU's readings change; bounded like
-- num's memo).
local entry_memo, entry_n = {}, 0
local function free_entry(r, v)
  local e = entry_memo[v]
  if not e then
    local a = string.find(v, '|', 1, true)
    local b = string.find(v, '|', a + 1, true)
    e = {tonumber(string.sub(v, 1, a - 1)) or 0, tonumber(string.sub(v, a + 1, b - 1)) or 0,
      string.sub(v, b + 1)}
    if entry_n >= MEMO_MAX then entry_memo, entry_n = {}, 0 end
    entry_memo[v], entry_n = e, entry_n + 1
  end
  local mem, util = e[1], e[2]
  return mem, util, e[3], mem >= r.minm and (r.maxm <= 0 or mem <= r.maxm) and util <= r.util
end

-- Qualifying free GPUs of one node for an exclusive request (one read: node_free_gpus).
local function node_candidates(r, node)
  local q = {}
  local h = rcall('HGETALL', k_free(node))
  for i = 1, #h, 2 do
    local mem, util, uuid, ok = free_entry(r, h[i + 1])
    if ok and model_ok(r, node, h[i]) then
      local idx = h[i]
      q[#q + 1] = {idx = idx, mem = mem, util = util, uuid = uuid, pref = r.pref[idx] and 1 or 0}
    end
  end
  return q
end

-- The one GPU a single-GPU request without preferences gets on a node (the same choice as
-- node_candidates + rank_gpus, without a table per candidate): most free memory, then the
-- lowest utilization, then the lowest index. nil when none qualifies.
local function node_best1(r, node)
  local h = rcall('HGETALL', k_free(node))
  local best, bmem, butil, bidx, be
  local minm, maxm, maxu, anymodel = r.minm, r.maxm, r.util, r.pat == ''
  -- the memos read inline (a Lua call per entry costs as much as the test; a memo a reset
  -- replaced meanwhile still holds right values)
  local memo, nm = entry_memo, num_memo
  for i = 1, #h, 2 do
    -- free_entry's test, inlined; a miss goes through it once, which memoizes the entry
    local v = h[i + 1]
    local e = memo[v]
    if not e then
      free_entry(r, v)
      memo = entry_memo
      e = memo[v]
    end
    local mem, util = e[1], e[2]
    if mem >= minm and (maxm <= 0 or mem <= maxm) and util <= maxu and
        (anymodel or model_ok(r, node, h[i])) then
      -- the index compared (as a number) only on a tie of memory and utilization
      if not best or mem > bmem or (mem == bmem and (util < butil or
          (util == butil and (nm[h[i]] or num(h[i])) < bidx))) then
        best, bmem, butil, be = i, mem, util, e
        bidx = nm[h[i]] or num(h[i])
      end
    end
  end
  if not best then return nil end
  return {idx = h[best], mem = bmem, util = butil, uuid = be[3], pref = 0}
end

local function rank_gpus(a, b)
  if a.pref ~= b.pref then return a.pref > b.pref end
  if a.mem ~= b.mem then return a.mem > b.mem end
  if a.util ~= b.util then return a.util < b.util end
  return tonumber(a.idx) < tonumber(b.idx)
end

--[[
  Reservations and backfill (see includes/reservations.lua for who reserves). A node reserved
  for a request ranked ahead is held back from the requests behind it, with two exceptions:
  * backfill on lease end: an exclusive request whose lease ends by the reserved start (NOW +
    lease <= start) may use the node's GPUs; they are free again when the reserved request
    needs them;
  * spare GPUs (only with tenants configured, tenants_on()): GPUs the node will have free by
    the reserved start beyond the k the reserved request needs may go to anyone.
  node_start(r, node): the reserved start on one node: the k-th earliest time a qualifying GPU
  is free (now for free ones, the exclusive holder's lease end otherwise; a lease without
  expiry, or shared holders in the way of an exclusive request, count as never = 1e18), and
  how many more are free by then (spare), and the k-th time before it is raised to NOW (a lease
  past its end: the node whose lease ended first is chosen). nil when the node has fewer than
  k such GPUs.
]]
local NEVER = 1e18

local function node_start(r, node)
  local times = {}
  for _, idx in ipairs(node_indexes(node)) do
    local g = rcall('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
      'memory_total_mb', 'excl', 'shared_n', 'name')
    if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and (tonumber(g[4]) or 0) >= r.minm
        and model_matches(r.pat, g[7]) then
      local t = NOW
      if g[5] and g[5] ~= '' then
        t = tonumber(rcall('ZSCORE', K_LEASES, g[5]) or '') or NEVER
        if t > NEVER then t = NEVER end
      elseif (tonumber(g[6] or '0') or 0) > 0 and r.sharing ~= 'shared' then
        t = NEVER
      end
      times[#times + 1] = t
    end
  end
  local k = r.sharing == 'shared' and 1 or r.k
  if #times < k then return nil end
  table.sort(times)
  local raw = times[k]
  local t = raw < NOW and NOW or raw -- a lease past its end holds the GPU until the reaper's pass
  local spare = 0
  for i = k + 1, #times do
    if times[i] <= t then spare = spare + 1 end
  end
  return t, spare, raw
end

-- blocked: node -> {id = the reserved request ranked ahead, r = it when loaded}; its start
-- and spare are worked out on first use. held_hit: a node was held back from the last place()
-- (its failure then depends on the lease, not only on the shape).
local held_hit = false

-- Backfill: an exclusive request whose lease ends by the reserved start. Not a shared one:
-- the reservations count a GPU with shared holders as never free (their leases are not
-- indexed by GPU), so a shared backfill would move the start it was judged against.
local function backfills(r, b)
  return r.sharing ~= 'shared' and r.lease >= 0 and b.t < NEVER and NOW + r.lease <= b.t
end

local function held_back(r, node, blocked)
  local b = blocked[node]
  if not b then return false end
  if b.t == nil then
    local holder = b.r or load_req(b.id)
    local t, spare
    if holder then t, spare = node_start(holder, node) end
    b.t, b.spare = t or NEVER, tenants_on() and spare or 0
  end
  if backfills(r, b) then return false end
  if b.spare >= (r.sharing == 'shared' and 1 or r.k) then return false end
  held_hit = true
  return true
end

-- Before a grant on a node another request reserved: GPUs kept past the start use its spare
-- (a shared request joining shared holders takes nothing: that GPU already counted as never).
local function took(r, node, blocked, chosen)
  local b = blocked[node]
  if b and b.t and not backfills(r, b) then
    if r.sharing == 'shared' then
      if (tonumber(rcall('HGET', k_gpu(node, chosen[1].idx), 'shared_n')) or 0) == 0 then
        b.spare = b.spare - 1
      end
    else
      b.spare = b.spare - r.k
    end
  end
end

-- Exclusive placement: best fit over nodes by free-GPU count, preferred GPUs outranking it.
local function place_exclusive(r, blocked, first)
  local k = r.k
  if k == 1 and r.npref == 0 then
    -- the common case: the first live node (fewest free GPUs first) with a qualifying GPU.
    -- first: how many nodes the first read asks for: 1 for allocate's request on an empty
    -- queue (the first node usually takes it: seven reply elements fewer, ~7k instructions),
    -- else 8 (a pass that walks a queue nothing fits would read twice per placement: +50 %)
    local offset = 0
    while true do
      local batch = rcall('ZRANGEBYSCORE', K_FREE, 1, '+inf', 'LIMIT', offset,
        offset == 0 and (first or 8) or 64)
      if #batch == 0 then return nil end
      for _, node in ipairs(batch) do
        if node_ok(r, node) and node_alive(node) and not held_back(r, node, blocked) then
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
    local batch = rcall('ZRANGEBYSCORE', K_FREE, k, '+inf', 'LIMIT', offset,
      offset == 0 and 8 or 64)
    if #batch == 0 then break end
    for _, node in ipairs(batch) do
      if node_ok(r, node) and node_alive(node) and not held_back(r, node, blocked) then
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
    local batch = rcall('ZRANGEBYSCORE', K_SHARED, r.minm, hi, 'WITHSCORES', 'LIMIT',
      offset, 128)
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      local node, idx = split_member(batch[i])
      if node and node_ok(r, node) and node_alive(node) and not held_back(r, node, blocked) then
        local g = rcall('HMGET', k_gpu(node, idx), 'utilization', 'uuid', 'name')
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

local function place(r, blocked, first)
  held_hit = false
  if r.sharing == 'shared' then return place_shared(r, blocked) end
  return place_exclusive(r, blocked, first)
end

-- Take one GPU for a request. An exclusive pick was free (in_free = 1, so in_busy = 0 and it
-- sits in shared_capacity): flip it directly instead of re-reading it. Free to allocated (and
-- back, in return_gpu) changes no fleet counter: counts.lua derives the allocated GPUs from
-- nodes_free and meta.gpus_out, which only a GPU that is neither changes.
local function take_gpu(r, node, idx)
  local gk, fk, member = gpu_names(node, idx)
  if r.sharing == 'shared' then
    rcall('HINCRBY', gk, 'shared_n', 1)
    rcall('HINCRBY', gk, 'shared_mb', string.format('%d', r.minm))
    gpu_sync(node, idx)
  else
    rcall('HSET', gk, 'excl', r.id, 'in_free', '0', 'in_busy', '1')
    rcall('HDEL', fk, idx)
    rcall('ZINCRBY', K_FREE, '-1', node)
    rcall('ZREM', K_SHARED, member)
  end
end

-- Give one GPU back from allocation id (the caller bumps the capacity version).
local function return_gpu(id, sharing, minm, node, idx)
  local gk, fk, member = gpu_names(node, idx)
  if sharing == 'shared' then
    rcall('HINCRBY', gk, 'shared_n', -1)
    rcall('HINCRBY', gk, 'shared_mb', string.format('%d', -minm))
    gpu_sync(node, idx)
    return
  end
  local g = rcall('HMGET', gk, 'excl', 'health', 'cordoned', 'lost', 'memory_free_mb',
    'shared_n', 'in_busy', 'utilization', 'uuid')
  if g[1] ~= id then return end
  if g[6] ~= '0' or g[7] ~= '1' then
    rcall('HSET', gk, 'excl', '')
    gpu_sync(node, idx)
    return
  end
  local ok = g[2] == 'ok' and g[3] ~= '1' and g[4] ~= '1'
  rcall('HSET', gk, 'excl', '', 'in_busy', '0', 'in_free', ok and '1' or '0')
  if not ok then meta_incr('gpus_out', 1) end -- it turned unusable while held
  if ok then
    rcall('HSET', fk, idx, (g[5] or '0') .. '|' .. (g[8] or '0') .. '|' .. (g[9] or ''))
    rcall('ZINCRBY', K_FREE, '1', node)
    -- the reading as stored when it is the score (no number printed back to a string)
    local m = g[5] or '0'
    local cap = num(m) or 0
    if cap < 0 then cap, m = 0, '0' elseif cap ~= cap then m = cap end
    rcall('ZADD', K_SHARED, m, member)
  end
end

--[[
  Admission checks of allocate (library functions with parameters: a local function of the
  allocate body would be a new closure, with its upvalues, on every call).
]]

-- With a gpu_model or a nodes list the fleet-wide maxima say too little: look for one allowed
-- node that could ever hold the request (k GPUs of the model with enough memory, free or not).
-- O(GPUs on the allowed nodes), paid only by requests that name a model or nodes.
local function never_fits(k, minm, pat, nodes_raw)
  local allowed = nil
  if nodes_raw ~= '[]' then
    allowed = {}
    for _, n in ipairs(cjson.decode(nodes_raw)) do allowed[n] = true end
  end
  local any_node, any_model, most = false, false, 0
  for _, node in ipairs(rcall('ZRANGE', K_SIZES, 0, -1)) do
    if not allowed or allowed[node] then
      any_node = true
      local n = 0
      for _, idx in ipairs(node_indexes(node)) do
        local g = rcall('HMGET', k_gpu(node, idx), 'name', 'memory_total_mb')
        if model_matches(pat, g[1]) then
          any_model = true
          if (tonumber(g[2]) or 0) >= minm then n = n + 1 end
        end
      end
      if n >= k then return nil end
      if n > most then most = n end
    end
  end
  if not any_node then return {-6, 'nodes', '0'} end
  if not any_model then return {-6, 'gpu_model', '0'} end
  return {-6, 'no_node', tostring(most)}
end

-- Can it never fit? (the fleet's maxima in meta). A request that a node can take now fits:
-- for a plain one (exclusive, no preferred GPUs) the answer is needed only when it does not
-- get GPUs at once, or before another error (the order of the errors stays the same).
local function never(f, k, minm, pat, nodes_raw)
  local m = rcall('HMGET', K_META, 'gpus_total', 'max_node_gpus', 'max_gpu_mb')
  if (tonumber(m[1]) or 0) == 0 then
    return {-6, 'no_gpus', '0'}
  elseif k > tonumber(m[2]) then
    return {-6, 'required_gpus', m[2]}
  elseif minm > tonumber(m[3]) then
    return {-6, 'min_memory_mb', m[3]}
  end
  -- the highest preferred GPU index (the engine sorts the list); a node of n GPUs has 0..n-1
  local pref = f.preferred_gpus ~= '[]' and cjson.decode(f.preferred_gpus)
  if pref and pref[#pref] >= tonumber(m[2]) then
    return {-6, 'preferred_gpus', m[2]}
  elseif pat ~= '' or nodes_raw ~= '[]' then
    return never_fits(k, minm, pat, nodes_raw)
  end
  return nil
end

-- Remember an idempotency key (key "" = none) for the request it created.
local function remember_idem(key, id, hash, ttl)
  if key ~= '' then
    rcall('SET', k_idem(key), id .. '|' .. hash, 'EX', math.floor(ttl))
  end
end
