--[[
  nodes: node lifecycle pieces (inlined after the prelude by the scripts that need them:
  forget, reap, report_node). Kept out of the prelude so the hot scripts (allocate, release)
  do not create these functions on every call.
]]

-- Live allocations on a node, or on one GPU of it (idx: its index as a string). A scan of the
-- leases: only admin actions, node forgets and health transitions of held GPUs call it.
local function allocs_on(node, idx)
  local out = {}
  for _, id in ipairs(rcall('ZRANGE', K_LEASES, 0, -1)) do
    local f = rcall('HMGET', k_req(id), 'node', 'gpu_ids')
    if f[1] == node then
      if idx == nil then
        out[#out + 1] = id
      else
        for _, i in ipairs(cjson.decode(f[2] or '[]')) do
          if string.format('%d', i) == idx then
            out[#out + 1] = id
            break
          end
        end
      end
    end
  end
  return out
end

-- Tell each holder that GPUs under its allocation turned unhealthy: one event and (with a
-- webhook_url) one gpu_unhealthy webhook per allocation, naming every such GPU and its health.
-- affected: {[id] = {{index = n, health = h}, ...}}, ids: the allocation ids in order.
local function notify_unhealthy(node, affected, ids)
  for _, id in ipairs(ids) do
    local f = rcall('HMGET', k_req(id), 'service_name', 'webhook_url')
    local gpus = affected[id]
    local evid = event('allocation_unhealthy', id, f[1], {'node', node,
      'gpus', cjson.encode(gpus)})
    outbox('gpu_unhealthy', id, evid, f[2], nil, true, nil, {gpus = gpus, node = node})
  end
end

-- Forget a node: its live allocations end as lost (webhook `lost`), its GPUs leave every
-- index, a reservation on it is dropped (the request may reserve again), and the node is gone
-- until its monitor reports it again. by: who did it (a principal, or "system"). Returns the
-- ids of the allocations that ended.
local function forget_node(node, by, reason)
  local lost = allocs_on(node, nil)
  for _, id in ipairs(lost) do finish_alloc(id, 'lost') end
  for _, idx in ipairs(node_indexes(node)) do
    local gk = k_gpu(node, idx)
    local f = rcall('HMGET', gk, 'in_free', 'in_busy')
    if f[1] == '1' then
      rcall('ZINCRBY', K_FREE, '-1', node)
    end
    if f[1] ~= '1' and f[2] ~= '1' then meta_incr('gpus_out', -1) end
    local member = node .. '|' .. idx
    rcall('ZREM', K_SHARED, member)
    rcall('ZREM', K_GPUS, member)
    rcall('DEL', gk)
  end
  rcall('DEL', k_free(node), k_node(node))
  rcall('ZREM', K_FREE, node)
  rcall('ZREM', K_SIZES, node)
  rcall('ZREM', K_NODES, node)
  index_cache[node], alive_cache[node] = nil, nil
  local holder = rcall('HGET', K_RES, node)
  if holder then
    rcall('HDEL', K_RES, node)
    rcall('HDEL', k_holds(), node)
    rcall('HSET', k_req(holder), 'reserved_node', '')
    rcall('ZADD', K_QUNRES, NOW_S, holder)
  end
  rcall('HSET', K_META, 'max_node_gpus', top_score(K_SIZES), 'max_gpu_mb',
    top_score(K_GPUS), 'gpus_total', rcall('ZCARD', K_GPUS))
  bump_capacity()
  event('node_forgotten', '', '', {'node', node, 'by', by, 'reason', reason,
    'allocations_lost', tostring(#lost)})
  return lost
end
