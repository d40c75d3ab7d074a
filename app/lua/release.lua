--[[
  release: end one allocation and hand its GPUs to the queue (a queued request is cancelled).

  KEYS[1], ARGV[1..2]: the common block (includes/prelude.lua).
  ARGV[A+1] id   ARGV[A+2] principal ("" = auth off)   ARGV[A+3] "1" when admin
  Returns: {1, record, granted records} or {-1, status} not found / already finished,
  {-2} the principal does not own it.
  Guarantees: releasing twice, or an unknown id, changes nothing.
]]
-- @include prelude
local id, principal, admin = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local f = redis.call('HMGET', k_req(id), 'status', 'owner')
if not f[1] then return {-1, ''} end
if principal ~= '' and admin ~= '1' and (f[2] or '') ~= principal then return {-2} end
if f[1] == 'allocated' then
  finish_alloc(id, 'released')
elseif f[1] == 'queued' then
  finish_queued(id, 'cancelled')
else
  return {-1, f[1]}
end
local granted = schedule(nil)
return {1, record(id), records(granted)}
