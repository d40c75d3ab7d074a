--[[
  watch: a long-poll's read after its listener subscribed (app/longpoll.py). Marks the record
  `watched` while it is queued or live, then reads it, in one atomic step: a change that runs
  before this read is seen by it; one that runs after it sees the mark and publishes on the
  changes channel (notify, includes/events.lua). A release of an allocation nobody long-polled
  publishes nothing (one Redis call less per release).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id
  Returns: {record hash as a flat list (empty: no such request), queue rank or -1}
]]
-- @include prelude
local id = ARGV[A + 1]
local rk = k_req(id)
local st = rcall('HGET', rk, 'status')
if st == 'queued' or st == 'allocated' or st == 'preempting' then
  rcall('HSET', rk, 'watched', '1')
end
if not st then return {{}, -1} end
return {rcall('HGETALL', rk), rcall('ZRANK', K_QUEUE, id) or -1}
