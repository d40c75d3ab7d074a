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
local upgraded = {}
local function upgrade_data()
  upgraded[P] = true
  local m = rcall('HMGET', K_META, 'gpus_out', 'gpus_busy')
  if m[1] then return end
  local free = 0
  local t = rcall('ZRANGEBYSCORE', K_FREE, 1, '+inf', 'WITHSCORES')
  for i = 2, #t, 2 do free = free + tonumber(t[i]) end
  local out = rcall('ZCARD', K_GPUS) - free - (tonumber(m[2] or '0') or 0)
  rcall('HSET', K_META, 'gpus_out', string.format('%d', out))
  if m[2] then rcall('HDEL', K_META, 'gpus_busy') end
end

local function begin_call(keys, argv, read_only)
  rcall = redis.call
  -- @bind
  if argv[1] ~= '' then
    NOW = tonumber(argv[1])
    NOW_S = string.format('%.6f', NOW) -- formatted once: most functions write it several times
  else
    -- TIME's seconds and microseconds are the digits of '%.6f' already: joined, not printed
    local t = rcall('TIME')
    local us = t[2]
    NOW_S = t[1] .. (#us == 6 and '.' or string.sub('.000000', 1, 7 - #us)) .. us
    NOW = tonumber(NOW_S)
  end
  stat_buf, meta_buf, queue_fns, qlen = nil, nil, nil, nil
  -- a fresh table only when the last call left something in it (fewer tables per call)
  if next(svc_labels) then svc_labels = {} end
  if next(alive_cache) then alive_cache = {} end
  if next(index_cache) then index_cache = {} end
  tq_cache, tq_map, tq_default = nil, nil, nil
  if not read_only and not upgraded[P] then upgrade_data() end
end
