  --[[
    reservations (inside queue(), after enqueue): queue rank, the cheap nothing-fits test and
    the reservation of a node for a long-waiting request or (tenants configured, tenants_on) a
    tenant's head request.
    Guarantees: at most one reservation per request, one per node; a reserved node is not given
    to requests ranked after it, except by backfill (a lease that ends by the reserved start)
    or on its spare GPUs (includes/placement.lua, held_back).
  ]]
  -- Does queued request a rank ahead of queued request b?
  local function ranks_before(a, b)
    local sa = rcall('ZSCORE', K_QUEUE, a)
    local sb = rcall('ZSCORE', K_QUEUE, b)
    if not sa or not sb then return false end
    sa, sb = tonumber(sa), tonumber(sb)
    if sa ~= sb then return sa < sb end
    return a < b
  end

  local function low_score(key)
    local t = rcall('ZRANGE', key, 0, 0, 'WITHSCORES')
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

  -- Reserve the node where r will fit soonest (node_start: the k-th earliest time a GPU that
  -- could hold it is free, a lease past its end by when it ended; ties to the smaller node). blocked: nodes reserved for requests
  -- ranked ahead. Returns the node, '' when none can take it now.
  local function reserve(r, blocked)
    local best, best_t, best_size = nil, nil, nil
    local sizes = rcall('ZRANGEBYSCORE', K_SIZES, r.sharing == 'shared' and 1 or r.k, '+inf',
      'WITHSCORES')
    for i = 1, #sizes, 2 do
      local node, size = sizes[i], tonumber(sizes[i + 1])
      if not blocked[node] and node_ok(r, node) and node_alive(node) and
          not rcall('HGET', K_RES, node) then
        local _, _, t = node_start(r, node)
        if t and (best == nil or t < best_t or (t == best_t and size < best_size)) then
          best, best_t, best_size = node, t, size
        end
      end
    end
    if best then
      rcall('ZREM', K_QUNRES, r.id)
      rcall('HSET', K_RES, best, r.id)
      rcall('HSET', k_req(r.id), 'reserved_node', best)
      r.reserved = best
      event('reserved', r.id, r.svc, {'node', best})
      return best
    end
    -- no node can take it now: try again after another reservation_after
    rcall('ZADD', K_QUNRES, NOW_S, r.id)
    return ''
  end

  -- A reservation holds its node back only while its tenant's max_gpus lets its holder be
  -- granted: a request its quota holds back holds nothing back (docs/scheduling.md, Quotas).
  -- Its tenant took more GPUs since it reserved, or the quota shrank: the pass that meets it
  -- drops the reservation (a preemption's hold is not a plain reservation: pass.lua leaves
  -- it). It counts as unreserved since its submission, so it may reserve again as soon as
  -- its quota lets it. h: the holder (loaded); node: its reserved node. true when dropped.
  local function unreserve_over_quota(h, node)
    if not quotas_on() or not over_quota(h) then return false end
    if rcall('HGET', K_RES, node) == h.id then
      rcall('HDEL', K_RES, node)
      bump_capacity()
    end
    rcall('HSET', k_req(h.id), 'reserved_node', '')
    rcall('ZADD', K_QUNRES, ftime(h.submitted), h.id)
    h.reserved = ''
    return true
  end

  -- Whose head request a request may be (tenants.key; before tenants, the owner's bucket).
  local function tenant_of(r)
    if r.tenant ~= '' then return r.tenant end
    return owner_bucket(r.owner, r.svc)
  end
