--[[
  release: end one allocation and hand its GPUs to the queue (a queued request is cancelled; a
  preempting allocation ends as preempted).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] principal ("" or absent = auth off)   ARGV[A+3] "1" when admin
  (absent = not)
  Returns: {1, number granted, status, service_name, ended_at, released_at ("" = none)}: the
  ending, not the whole record (the caller knows the rest, or reads it with get), or
  {-1, status} not found / already finished, {-2} the principal does not own it.
  Guarantees: releasing twice, or an unknown id, changes nothing.
]]
-- @include prelude
local id, principal, admin = ARGV[A + 1], ARGV[A + 2] or '', ARGV[A + 3]
-- one read of the fields the ending (FINISH_FIELDS) and the checks use (the pass below never
-- touches a record that is no longer queued or live)
local n = #FINISH_FIELDS
local v = redis.call('HMGET', k_req(id), unpack(RELEASE_FIELDS))
local st = v[n + 1]
if not st then return {-1, ''} end
if principal ~= '' and admin ~= '1' and (v[n + 2] or '') ~= principal then return {-2} end
local released_at = NOW_S
if st == 'allocated' then
  finish_alloc(id, 'released', v)
  st = 'released'
elseif st == 'preempting' then
  finish_alloc(id, 'preempted', v, true)
  st = 'preempted'
elseif st == 'queued' then
  finish_queued(id, 'cancelled')
  st, released_at = 'cancelled', ''
else
  return {-1, st}
end
local granted = schedule(nil)
return {1, #granted, st, v[5] or '', NOW_S, released_at}
