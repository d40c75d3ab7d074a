--[[
  release: end one allocation and hand its GPUs to the queue (a queued request is cancelled; a
  preempting allocation ends as preempted).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] principal ("" or absent = auth off)   ARGV[A+3] "1" when admin
  (absent = not)
  Returns: "granted|status|ended_at|released_at|service_name" (granted: how many requests its
  pass granted; released_at "" = none; the service last, whatever it holds): the ending, not
  the whole record (the caller knows the rest, or reads it with get), as one string (one
  reply element, not six: each costs the server ~2.4k instructions), or
  {-1, status} not found / already finished, {-2} the principal does not own it.
  Guarantees: releasing twice, or an unknown id, changes nothing.
]]
-- @include prelude
local id, principal, admin = ARGV[A + 1], ARGV[A + 2] or '', ARGV[A + 3]
-- one read of the fields the ending (FINISH_FIELDS, but the rarely stored last ones) and the
-- checks use (the pass below never touches a record that is no longer queued or live)
local n = RELEASE_READ
-- the owner only when a principal must own it (a field fewer to read: ~1.4k instructions)
local check = principal ~= '' and admin ~= '1'
local v = rcall('HMGET', k_req(id), unpack(check and RELEASE_FIELDS or RELEASE_FIELDS_NO_OWNER))
local st = v[n + 1]
if not st then return {-1, ''} end
if check and (v[n + 2] or '') ~= principal then return {-2} end
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
return #granted .. '|' .. st .. '|' .. NOW_S .. '|' .. released_at .. '|' .. (v[4] or '')
