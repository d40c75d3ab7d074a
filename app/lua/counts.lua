--[[
  counts: the gauges the metrics report, from the indexes (no scan of GPUs or requests).

  KEYS[1], ARGV[1]: the common block (includes/prelude.lua).
  Returns: {allocations_active, gpus_allocated, queue_depth, gpus_total, gpus_available}
  gpus_available: free, healthy, schedulable GPUs on nodes whose heartbeat is current.
]]
-- @include prelude
local available = tonumber(redis.call('HGET', K_META, 'gpus_free') or '0')
local lapsed = redis.call('ZRANGEBYSCORE', K_NODES, '-inf', '(' .. ftime(NOW - HB_TIMEOUT))
for _, node in ipairs(lapsed) do
  available = available - (tonumber(redis.call('ZSCORE', K_FREE, node) or '0') or 0)
end
return {redis.call('ZCARD', K_LEASES), tonumber(redis.call('HGET', K_META, 'gpus_busy') or '0'),
  redis.call('ZCARD', K_QUEUE), redis.call('ZCARD', K_GPUS), available}
