--[[
  call: begin_call, run first by every function of the library (after the other includes, so
  it sees their state). A library's locals outlive a call, so everything a call may leave
  behind is reset here: the per-call caches, the buffers of a pass an error interrupted, and
  the queue's functions (built on first use per call, with state of their own).
]]
-- Data of an earlier release, brought to this one's shape by the first writing call per prefix
-- after the library loads (a library's locals outlive calls; a server started on old data
-- loads the library afresh): meta.gpus_busy, which every grant and release kept, becomes
-- meta.gpus_out (GPUs neither free nor allocated), which only the rare transitions change.
-- And each owner's queued requests by tenant (k_qotenants, see owner_count) are rebuilt from
-- the queue, after every load: a release without them, or the other release of a rolling
-- upgrade, may have queued and dequeued requests since (O(queue) once per load and prefix:
-- measured 65 ms of Redis at 10,000 queued on a loaded 2-core VM; the next write took 0.2 ms).
local upgraded = {}
local function upgrade_data()
  upgraded[P] = true
  for _, b in ipairs(rcall('HKEYS', K_QOWNERS)) do
    if string.sub(b, 1, 2) == 'o:' then rcall('DEL', k_qotenants(string.sub(b, 3))) end
  end
  local offset = 0
  while true do
    local ids = rcall('ZRANGE', K_QUEUE, offset, offset + 499)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      local f = rcall('HMGET', k_req(id), 'owner', 'tenant')
      if f[1] and f[1] ~= '' then rcall('HINCRBY', k_qotenants(f[1]), f[2] or '', 1) end
    end
    offset = offset + #ids
  end
  local m = rcall('HMGET', K_META, 'gpus_out', 'gpus_busy')
  if m[1] then return end
  local free = 0
  local t = rcall('ZRANGEBYSCORE', K_FREE, 1, '+inf', 'WITHSCORES')
  for i = 2, #t, 2 do free = free + tonumber(t[i]) end
  local out = rcall('ZCARD', K_GPUS) - free - (tonumber(m[2] or '0') or 0)
  rcall('HSET', K_META, 'gpus_out', string.format('%d', out))
  if m[2] then rcall('HDEL', K_META, 'gpus_busy') end
end

-- @bind

-- Binds the call's fixed keys and common argument (bind, when they changed); false (nothing
-- bound) when the caller expects another version of the library.
local function begin_call(keys, argv, read_only)
  if (argv[1] ~= COMMON_RAW or keys[1] ~= K_NODES) and not bind(keys, argv[1]) then
    return false
  end
  rcall = redis.call
  if A == 2 then -- a clock the caller passed (ARGV[2])
    NOW = tonumber(argv[2])
    NOW_S = string.format('%.6f', NOW) -- formatted once: most functions write it several times
    NOW_SEC = nil
  else
    -- TIME's seconds and microseconds are the digits of '%.6f' already: joined, not printed
    local t = rcall('TIME')
    local us = t[2]
    NOW_SEC = t[1]
    NOW_S = NOW_SEC .. (#us == 6 and '.' or string.sub('.000000', 1, 7 - #us)) .. us
    NOW = tonumber(NOW_S)
  end
  stat_buf, meta_buf, queue_fns, qlen = nil, nil, nil, nil
  -- a fresh table only when the last call left something in it (fewer tables per call)
  if next(svc_labels) then svc_labels = {} end
  if next(alive_cache) then alive_cache = {} end
  if next(index_cache) then index_cache = {} end
  tq_cache, tq_map, tq_default = nil, nil, nil
  if not read_only and not upgraded[P] then upgrade_data() end
  return true
end
