--[[
  snapshot: one consistent view of the whole state (dashboards, the invariant tests).

  KEYS[1], ARGV[1]: the common block (includes/prelude.lua).
  ARGV[A+1] "1": GPUs and nodes only (allocations and queue left empty; cheaper for metrics)
  Returns: JSON {now, gpus: [flat hash...], nodes: [...], allocations: [...], queue: [...]}
  (queue in rank order; each entry a flat field/value list).
]]
-- @include prelude
local out = {now = NOW, gpus = {}, nodes = {}, allocations = {}, queue = {}}
for _, m in ipairs(redis.call('ZRANGE', K_GPUS, 0, -1)) do
  local node, idx = split_member(m)
  out.gpus[#out.gpus + 1] = redis.call('HGETALL', k_gpu(node, idx))
end
for _, node in ipairs(redis.call('ZRANGE', K_NODES, 0, -1)) do
  out.nodes[#out.nodes + 1] = redis.call('HGETALL', k_node(node))
end
if ARGV[A + 1] ~= '1' then
  for _, id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    out.allocations[#out.allocations + 1] = record(id)
  end
  for _, id in ipairs(redis.call('ZRANGE', K_QUEUE, 0, -1)) do
    out.queue[#out.queue + 1] = record(id)
  end
end
return cjson.encode(out)
