--[[
  release: end one allocation and hand its GPUs to the queue (a queued request is cancelled; a
  preempting allocation ends as preempted).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] principal ("" = auth off)   ARGV[A+3] "1" when admin
  Returns: {1, record, number granted} or {-1, status} not found / already finished,
  {-2} the principal does not own it.
  Guarantees: releasing twice, or an unknown id, changes nothing.
]]
-- @include prelude
local id, principal, admin = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
-- one read of the whole record: the checks, the release and the reply all use it (the pass
-- below never touches a record that is no longer queued or live)
local h = redis.call('HGETALL', k_req(id))
local rec = {}
for i = 1, #h, 2 do rec[h[i]] = h[i + 1] end
if not rec.status then return {-1, ''} end
if principal ~= '' and admin ~= '1' and (rec.owner or '') ~= principal then return {-2} end
if rec.status == 'allocated' then
  finish_alloc(id, 'released', rec)
elseif rec.status == 'preempting' then
  finish_alloc(id, 'preempted', rec, true)
elseif rec.status == 'queued' then
  finish_queued(id, 'cancelled')
  rec = nil
else
  return {-1, rec.status}
end
local granted = schedule(nil)
return {1, rec and cjson.encode(rec) or record(id), #granted}
