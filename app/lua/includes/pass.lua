  --[[
    pass (included inside queue(), after the reservations). The schedule pass.
    Walks the queue in rank order (priority desc, FIFO; aging is in the score)
    and grants what fits. Guarantee: a grant never overtakes a higher-ranked waiting request that
    fits, because higher-ranked ones were tried first against at least the capacity now left.

    Cost control:
    * meta.capver counts capacity appearing (GPU freed, node back, dependency finished,
      reservation dropped); meta.passver is capver at the last full pass. Equal: every queued
      request already failed against at least today's capacity, so only new_id is tried.
      force (the periodic safety-net pass) walks regardless.
    * nothing_fits(): smallest queued demand vs best free capacity, O(log n).
    * in the walk, a demand shape that failed is not tried again (capacity only shrinks).
  ]]
  -- reservations one full pass may make, and how deep in the queue it looks for tenants' heads
  -- (HEAD_SCAN), and how far past the point where a walk stopped (SWEEP)
  local MAX_NEW_RES, HEAD_SCAN, SWEEP = 8, 500, 100

  -- The new request of an allocate reserves after its queued event (reserve_new), when the
  -- walk found it its tenant's head (or long-waiting); new_wants: nil when no walk saw it.
  -- A tenant's head is its first queued request a pass does not place; it reserves when it is
  -- exclusive and its dependencies are done (a shared one waits for memory on any GPU and
  -- holds no node back, unless it waited reservation_after).
  local new_wants = nil

  -- allocate, after the queued event: the new request reserves when it is its tenant's head
  -- (the walk said so, or it is its tenant's only queued request) and does not fit.
  local function reserve_new(id)
    if RES_AFTER < 0 or POLICY == 'strict_fifo' or new_wants == false then return end
    local r = load_req(id)
    if not r or r.status ~= 'queued' or r.reserved ~= '' or not deps_done(r) then return end
    if new_wants == nil and RES_AFTER > 0 and (r.sharing == 'shared' or (r.tenant ~= '' and
        tenant_queued(r.tenant) or
        tonumber(redis.call('HGET', K_QOWNERS, owner_bucket(r.owner, r.svc)) or '0')) ~= 1) then
      return
    end
    reserve(r, {})
  end

  local function schedule_inner(new_id, force)
    local granted = {}
    if redis.call('ZCARD', K_QUEUE) == 0 then return granted end
    local capver = redis.call('HGET', K_META, 'capver') or '0'
    local full = force or capver ~= (redis.call('HGET', K_META, 'passver') or '')
    if not full and RES_AFTER >= 0 and POLICY ~= 'strict_fifo' then
      local due = low_score(K_QUNRES)
      if due and due <= NOW - RES_AFTER then full = true end
    end
    if not full then
      if new_id == nil then
        stat('sched|passes_skipped')
        return granted
      end
      if POLICY == 'strict_fifo' and redis.call('ZRANK', K_QUEUE, new_id) ~= 0 then
        return granted
      end
      local r = load_req(new_id)
      if not r or r.status ~= 'queued' or not deps_done(r) then return granted end
      local blocked = {}
      local res = redis.call('HGETALL', K_RES)
      -- a preemption's hold is a reservation nobody else may use (no backfill, no spare)
      local holds = #res > 0 and read_holds() or nil
      for i = 1, #res, 2 do
        if holds and holds[res[i]] == res[i + 1] then
          if res[i + 1] ~= new_id then
            blocked[res[i]] = {id = res[i + 1], t = NEVER, spare = 0}
          end
        elseif ranks_before(res[i + 1], new_id) then
          blocked[res[i]] = {id = res[i + 1]}
        end
      end
      local node, chosen = place(r, blocked)
      if node then
        grant(r, node, chosen, true, false)
        granted[1] = new_id
      end
      return granted
    end
    redis.call('HSET', K_META, 'passver', capver)
    stat('sched|passes')
    local blocked, failed, fail_lease = {}, {}, {}
    local may_reserve = RES_AFTER >= 0 and POLICY ~= 'strict_fifo'
    local new_reservations, head_seen = 0, {}
    local reserved_by, due, possible = {}, {}, {}
    -- tenants with queued requests whose head this pass has not met yet
    local tenants_left = may_reserve and redis.call('HLEN', K_QOWNERS) or 0
    if may_reserve then
      local res = redis.call('HGETALL', K_RES)
      for i = 1, #res, 2 do reserved_by[res[i + 1]] = res[i] end
      local waited = redis.call('ZRANGEBYSCORE', K_QUNRES, '-inf', ftime(NOW - RES_AFTER))
      for _, id in ipairs(waited) do due[id] = true end
    end
    -- nodes held for a preemption's request: blocked for every other request from the start
    -- (no backfill, no spare GPUs); held_node: holder id -> its node
    local held_node = {}
    for node, hid in pairs(read_holds() or {}) do
      blocked[node] = {id = hid, t = NEVER, spare = 0}
      held_node[hid] = node
    end

    -- A queued request the pass did not place (r: it, when read; eligible: its dependencies
    -- are done; rank: its place in the queue now). The first one of each tenant is the
    -- tenant's head: when it is an eligible exclusive request it reserves; so does one that
    -- waited reservation_after. Its reserved node is held back from the requests after it.
    local function consider(id, r, eligible, rank)
      local rn = reserved_by[id]
      local want = due[id]
      if tenants_left > 0 and rank <= HEAD_SCAN then
        if r == nil then
          r = load_req(id)
          eligible = r ~= nil and deps_done(r)
        end
        if r then
          local t = tenant_of(r)
          if not head_seen[t] then
            head_seen[t] = true
            tenants_left = tenants_left - 1
            if eligible and r.sharing ~= 'shared' then want = true end
          end
        end
      end
      if id == new_id then
        -- reserved by allocate after its queued event (reserve_new)
        new_wants = want and true or false
        want = false
      end
      if not rn and want and may_reserve and new_reservations < MAX_NEW_RES then
        r = r or load_req(id)
        if r then
          rn = reserve(r, blocked)
          if rn == '' then may_reserve = false else new_reservations = new_reservations + 1 end
        end
      end
      if rn and rn ~= '' and not held_node[id] then blocked[rn] = {id = id, r = r} end
    end

    -- When the walk stops early because nothing fits any more, the heads it did not reach
    -- still reserve: the first SWEEP ranks from `from`, until every tenant's head was met.
    local function sweep(from)
      if not may_reserve or tenants_left <= 0 or from >= SWEEP then return end
      local ids = redis.call('ZRANGE', K_QUEUE, from, SWEEP - 1)
      for i, id in ipairs(ids) do
        if tenants_left <= 0 then break end
        consider(id, nil, nil, from + i)
      end
    end

    if nothing_fits() then
      sweep(0)
      return granted
    end
    local maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
    local offset = 0
    while true do
      local ids = redis.call('ZRANGE', K_QUEUE, offset, offset + 499)
      if #ids == 0 then break end
      local removed = 0
      local shapes = redis.call('HMGET', K_QSHAPE, unpack(ids))
      for i, id in ipairs(ids) do
        -- the shape first (500 per read): a shape that already failed in this pass, or that
        -- the best free capacity cannot hold, is skipped without reading the request
        local shape = shapes[i]
        if shape then
          -- the shape without its lease (|L<seconds>, absent for requests queued before it)
          local sig, lease = string.match(shape, '^(.*)|L([^|]*)$')
          if sig then lease = tonumber(lease) else sig = shape end
          if lease and lease < 0 then lease = NEVER end
          local placed = false
          local ok = possible[sig]
          if ok == nil then
            local sharing, k, minm = string.match(sig, '^([^|]*)|([^|]*)|([^|]*)|')
            if sharing == 'shared' then
              ok = tonumber(minm) <= maxshared
            else
              ok = tonumber(k) <= maxfree
            end
            possible[sig] = ok
          end
          local r, eligible = nil, false
          -- a failure the reservations caused (held_hit) holds for every lease as long or
          -- longer (backfill needs a lease that ends by the reserved start): fail_lease[sig]
          -- a holder is tried whatever failed before it (its node is blocked for the others)
          local hn = held_node[id]
          if ok and (hn or (not failed[sig] and
              not (lease and lease >= (fail_lease[sig] or math.huge)))) then
            r = load_req(id)
            eligible = r ~= nil and deps_done(r)
            local rl = eligible and (r.lease < 0 and NEVER or r.lease)
            if eligible and (hn or rl < (fail_lease[sig] or math.huge)) then
              local hb = hn and blocked[hn]
              if hn then blocked[hn] = nil end
              local node, chosen = place(r, blocked)
              if hn and not node then
                if hold_lapsed(id) then
                  -- its victims are gone and it still does not fit: a plain reservation again
                  redis.call('HDEL', k_holds(), hn)
                  held_node[id] = nil
                  blocked[hn] = {id = id, r = r}
                else
                  blocked[hn] = hb
                end
              end
              if hn and not node then
                held_hit = false -- a holder's failure says nothing about its shape for others
              elseif node then
                took(r, node, blocked, chosen)
                grant(r, node, chosen, true, id ~= new_id)
                granted[#granted + 1] = id
                placed = true
                removed = removed + 1
                -- maxfree and maxshared are not re-read: capacity only shrinks in a pass, so
                -- a shape judged possible that no longer fits fails once in place()
              elseif held_hit then
                fail_lease[sig] = rl
              else
                failed[sig] = true
              end
            end
          end
          if not placed then
            if POLICY == 'strict_fifo' then return granted end
            consider(id, r, eligible, offset + i - removed)
          end
        end
      end
      dequeue_flush()
      dq_ids = {}
      if removed > 0 then
        if nothing_fits() then
          sweep(offset + #ids - removed)
          break
        end
        maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
        possible = {}
      end
      offset = offset + #ids - removed
    end
    return granted
  end

  -- One pass: dequeues are collected (see dequeue) and flushed however the pass ends.
  local function pass(new_id, force)
    dq_ids, dq_owners, dq_tenants, new_wants = {}, {}, {}, nil
    local granted = schedule_inner(new_id, force)
    dequeue_flush()
    dq_ids, dq_owners, dq_tenants = nil, nil, nil
    return granted
  end
