  --[[
    reservations (inside queue(), after enqueue): queue rank, the cheap nothing-fits test and
    the reservation of a node for a long-waiting request.
    Guarantees: at most one reservation per request; a reserved node is not given to requests
    ranked after it.
  ]]
  -- Does queued request a rank ahead of queued request b?
  local function ranks_before(a, b)
    local sa = redis.call('ZSCORE', K_QUEUE, a)
    local sb = redis.call('ZSCORE', K_QUEUE, b)
    if not sa or not sb then return false end
    sa, sb = tonumber(sa), tonumber(sb)
    if sa ~= sb then return sa < sb end
    return a < b
  end

  local function low_score(key)
    local t = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #t == 0 then return nil end
    return tonumber(t[2])
  end

  -- Cheap test: no queued demand can fit the best free capacity anywhere.
  local function nothing_fits()
    local minx, mins = low_score(K_QDX), low_score(K_QDS)
    local xfit = minx ~= nil and minx <= top_score(K_FREE)
    local sfit = mins ~= nil and mins <= top_score(K_SHARED)
    return not xfit and not sfit
  end

  -- Reserve the node where a long-waiting request will fit soonest: the k-th earliest time a
  -- GPU that could hold it becomes free (now for free ones, the holder's lease end otherwise).
  local function reserve(r, blocked)
    local best, best_t, best_size = nil, nil, nil
    local sizes = redis.call('ZRANGEBYSCORE', K_SIZES, r.k, '+inf', 'WITHSCORES')
    for i = 1, #sizes, 2 do
      local node, size = sizes[i], tonumber(sizes[i + 1])
      if not blocked[node] and node_ok(r, node) and node_alive(node) and
          not redis.call('HGET', K_RES, node) then
        local times = {}
        for _, idx in ipairs(node_indexes(node)) do
          local g = redis.call('HMGET', k_gpu(node, idx), 'health', 'cordoned', 'lost',
            'memory_total_mb', 'excl', 'shared_n', 'name')
          if g[1] == 'ok' and g[2] ~= '1' and g[3] ~= '1' and (tonumber(g[4]) or 0) >= r.minm
              and model_matches(r.pat, g[7]) then
            local t = NOW
            if g[5] and g[5] ~= '' then
              t = tonumber(redis.call('ZSCORE', K_LEASES, g[5]) or '1e18') or 1e18
            elseif (tonumber(g[6] or '0') or 0) > 0 and r.sharing ~= 'shared' then
              t = 1e18
            end
            times[#times + 1] = t
          end
        end
        if #times >= r.k then
          table.sort(times)
          local t = times[r.k]
          if best == nil or t < best_t or (t == best_t and size < best_size) then
            best, best_t, best_size = node, t, size
          end
        end
      end
    end
    if best then
      redis.call('ZREM', K_QUNRES, r.id)
      redis.call('HSET', K_RES, best, r.id)
      redis.call('HSET', k_req(r.id), 'reserved_node', best)
      event('reserved', r.id, r.svc, {'node', best})
      return best
    end
    -- no node can take it now: try again after another reservation_after
    redis.call('ZADD', K_QUNRES, NOW_S, r.id)
    return ''
  end
