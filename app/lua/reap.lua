--[[
  reap: expire allocations past expires_at and time out queued requests past their deadline,
  then run a schedule pass for the capacity that freed.

  KEYS[1], ARGV[1]: the common block (includes/prelude.lua).
  ARGV[A+1] most of each kind to end in one call
  Returns: {expired ids, timed-out ids, granted records}
]]
-- @include prelude
local limit = tonumber(ARGV[A + 1])
local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW_S, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do finish_alloc(id, 'expired') end
local timed_out = redis.call('ZRANGEBYSCORE', K_QDEAD, '-inf', NOW_S, 'LIMIT', 0, limit)
for _, id in ipairs(timed_out) do finish_queued(id, 'timed_out') end
return {expired, timed_out, records(schedule(nil))}
