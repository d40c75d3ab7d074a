--[[
  counts: the gauges the metrics report, from the indexes (no scan of GPUs or requests).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  Returns: {allocations_active, gpus_allocated, queue_depth, gpus_total, gpus_available,
  nodes_total, nodes_alive}
  gpus_total: GPUs of nodes whose heartbeat is current (a silent node's GPUs are not counted
  until it reports again or is forgotten).
  gpus_available: free, healthy, schedulable GPUs on nodes whose heartbeat is current.
]]
-- @include prelude
local all = rcall('ZCARD', K_GPUS)
local total = all
local lapsed = rcall('ZRANGEBYSCORE', K_NODES, '-inf', '(' .. ftime(NOW - HB_TIMEOUT))
local silent = {}
for _, node in ipairs(lapsed) do
  silent[node] = true
  total = total - (tonumber(rcall('ZSCORE', K_SIZES, node) or '0') or 0)
end
-- the free GPUs are counted per node in nodes_free only (a grant writes no fleet-wide counter):
-- O(nodes with a free GPU), paid by this read for the metrics, not by every grant and release
local available, free_all = 0, 0
local free = rcall('ZRANGEBYSCORE', K_FREE, 1, '+inf', 'WITHSCORES')
for i = 1, #free, 2 do
  local n = tonumber(free[i + 1])
  free_all = free_all + n
  if not silent[free[i]] then available = available + n end
end
-- allocated GPUs (silent nodes' too): every GPU is free, allocated, or neither (gpus_out), so
-- a grant or release writes no fleet-wide counter. Without gpus_out no call of this release
-- has written yet (upgrade_data, includes/call.lua): the earlier release's gpus_busy holds.
local m = rcall('HMGET', K_META, 'gpus_out', 'gpus_busy')
local busy = tonumber(m[2] or '0') or 0
if m[1] then busy = all - free_all - (tonumber(m[1]) or 0) end
if busy < 0 then busy = 0 end
local nodes = rcall('ZCARD', K_NODES)
return {rcall('ZCARD', K_LEASES), busy, rcall('ZCARD', K_QUEUE), total, available,
  nodes, nodes - #lapsed}
