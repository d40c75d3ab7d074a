--[[
  priority: an admin changes a queued request's priority; it moves in the queue at once.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] new priority (1..10, checked by the caller)   ARGV[A+3] principal
  Returns: {1, record, number granted}, {-1} unknown request, {-3, status} not queued.
  Guarantees: the request keeps its place among requests of its new priority by submission
  time (its score moves by exactly the priority difference, aging included), and a pass runs
  at once, so a request raised above what blocks it can be granted in this call.
]]
-- @include prelude
local id, prio, by = ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3]
local f = rcall('HMGET', k_req(id), 'status', 'priority', 'service_name', 'tenant')
if not f[1] then return {-1} end
if f[1] ~= 'queued' then return {-3, f[1]} end
local old = tonumber(f[2] or REC_DEFAULTS.priority) or 0
if old ~= prio then
  local score = tonumber(rcall('ZSCORE', K_QUEUE, id))
  -- scores: AGING * s - p with aging, -p * 1e12 + seq without (see enqueue in the prelude)
  local step = AGING > 0 and 1 or 1e12
  local moved = fnum(score + (old - prio) * step)
  rcall('ZADD', K_QUEUE, moved, id)
  if f[4] and f[4] ~= '' then rcall('ZADD', k_tqueue(f[4]), moved, id) end
  rcall('HSET', k_req(id), 'priority', string.format('%d', prio))
  bump_capacity()
  event('priority_changed', id, f[3], {'priority', string.format('%d', prio),
    'previous_priority', string.format('%d', old), 'by', by})
end
local granted = schedule(nil)
return {1, record(id), #granted}
