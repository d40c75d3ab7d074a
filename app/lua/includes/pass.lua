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
  -- HEADS: tenants are configured (tenants_on: fair_share, or tenants.quotas). Then each
  -- tenant's head reserves at once (issue 14); without, only requests that waited
  -- reservation_after reserve, as before tenants existed (the default config is today's).
  local HEADS = tenants_on()
  -- reservations one full pass may make, and how deep in the queue it looks for tenants' heads
  -- (HEAD_SCAN), and how far past the point where a walk stopped (SWEEP)
  local MAX_NEW_RES, HEAD_SCAN, SWEEP = HEADS and 8 or 4, 500, 100

  -- With HEADS, the new request of an allocate reserves after its queued event (reserve_new),
  -- when the walk found it its tenant's head (or long-waiting); new_wants: nil when no walk
  -- saw it. A tenant's head is its first queued request a pass does not place; it reserves when
  -- it is exclusive and its dependencies are done (a shared one waits for memory on any GPU and
  -- holds no node back, unless it waited reservation_after). Without HEADS the walk reserves
  -- what waited reservation_after, the new request included (reservation_after 0).
  local new_wants = nil

  -- With fair share, tenant t's head for the reservations: its first queued request within
  -- SWEEP of `from` (in its own queue) that holds a reservation, or that is exclusive,
  -- eligible (dependencies done) and within t's max_gpus. nil: t has none, so it does not
  -- stand in the way of the tenants above it (a tenant whose requests all wait for its quota,
  -- their dependencies, or memory on a shared GPU). n: read at most n (default SWEEP, n > 0);
  -- second result: how many were read.
  local function fair_head(t, from, n)
    local ids = rcall('ZRANGE', k_tqueue(t), from, from + (n or SWEEP) - 1)
    for _, id in ipairs(ids) do
      local r = load_req(id)
      if r and r.status == 'queued' and (r.reserved ~= '' or
          (r.sharing ~= 'shared' and deps_done(r) and not over_quota(r))) then
        return r
      end
    end
    return nil, #ids
  end

  -- allocate, after the queued event: the new request reserves when it is its tenant's head
  -- (the walk said so, or it is its tenant's only queued request) and does not fit.
  local function reserve_new(id)
    if not HEADS or RES_AFTER < 0 or POLICY == 'strict_fifo' or new_wants == false then return end
    local r = load_req(id)
    if not r or r.status ~= 'queued' or r.reserved ~= '' or not deps_done(r) or over_quota(r) then
      return
    end
    if new_wants == nil then
      -- no walk met it: its tenant's head when it is its tenant's only queued request (an
      -- exclusive one), or due at once (reservation_after 0; with fair share a shared one)
      local only = (r.tenant ~= '' and tenant_queued(r.tenant) or
        tonumber(rcall('HGET', K_QOWNERS, owner_bucket(r.owner, r.svc)) or '0')) == 1
      local head = only and r.sharing ~= 'shared'
      local due_now = RES_AFTER == 0 and (TENANT_FAIR ~= '1' or r.sharing == 'shared')
      if not head and not due_now then return end
    end
    if new_wants == nil and TENANT_FAIR == '1' then
      -- with fair share it reserves only as the lowest-share tenant with a head (the fair
      -- walk's rule: reservations follow the fair order). It reads at most SWEEP of the lower
      -- tenants' requests in all: past that it takes the next lower tenant to have a head, the
      -- rule before fair_head (lower tenants whose first requests all wait for memory, their
      -- quota or dependencies, 20 x 100 of them, made each such allocate 51 ms instead of 0.4)
      local mine, budget = tenant_share(r.tenant), SWEEP
      for _, t in ipairs(rcall('HKEYS', K_TQUEUED)) do
        if t ~= r.tenant then
          local sh = tenant_share(t)
          if sh < mine or (sh == mine and t < r.tenant) then
            if budget <= 0 then return end
            local h, read = fair_head(t, 0, budget)
            if h or (read == budget and budget < SWEEP) then return end
            budget = budget - read
          end
        end
      end
    end
    reserve(r, {})
  end

  -- Requests queued before tenants existed have no tenant, so no tenant's queue holds them:
  -- the first fair pass that finds some gives each the tenant engine.tenant_of gives a new
  -- one: its owner (the principal) with tenants.key: principal, else its service.
  local function adopt_untenanted()
    local n = 0
    for _, v in ipairs(rcall('HVALS', K_TQUEUED)) do n = n + (tonumber(v) or 0) end
    if n >= rcall('ZCARD', K_QUEUE) then return end
    local offset = 0
    while true do
      local ids = rcall('ZRANGE', K_QUEUE, offset, offset + 499, 'WITHSCORES')
      if #ids == 0 then break end
      for i = 1, #ids, 2 do
        local id = ids[i]
        local f = rcall('HMGET', k_req(id), 'tenant', 'owner', 'service_name')
        if (f[1] or '') == '' then -- engine.tenant_of's rule: the principal per tenants.key
          local t = (TENANT_KEY == 'principal' and f[2] and f[2] ~= '') and f[2] or (f[3] or '')
          rcall('HSET', k_req(id), 'tenant', t)
          rcall('ZADD', k_tqueue(t), ids[i + 1], id)
          tenant_queue_add(t, 1)
          if f[2] and f[2] ~= '' then -- counted under '' by its owner until now
            local k = k_qotenants(f[2])
            if rcall('HINCRBY', k, '', -1) <= 0 then rcall('HDEL', k, '') end
            rcall('HINCRBY', k, t, 1)
          end
        end
      end
      offset = offset + #ids / 2
    end
  end

  --[[
    The fair-share walk (tenants.fair_share). The next grant goes to the tenant with the lowest
    tenant_share ((decayed usage in GPU-hours + GPUs held) / weight; ties by name) among those
    with a queued request that fits; within a tenant, its own queue order (k_tqueue: priority
    with aging, then submission). After each grant the tenant's share is read again, so one
    pass spreads the GPUs it frees across tenants. A reserved node is held back from everyone
    but its holder (backfill as in the walk). Reservations follow the same order: only the
    lowest-share tenant whose head (its first eligible exclusive request that does not fit)
    cannot go, or already holds a reservation, reserves: its head at once, and its shared
    requests past reservation_after (so may those of a tenant met before it). A request its
    tenant's max_gpus holds back is skipped. strict_fifo: a tenant's first request that cannot
    go stops that tenant only.
    Cost: each queued request is looked at once per pass at most (its tenant's position only
    moves forward; capacity only shrinks in a pass), plus one share read per grant and a scan
    of the tenants with queued requests per grant.
  ]]
  -- The fair walk's order of tenants: lowest share first, then name. tenants[1..n] is a
  -- binary heap on it: the walk takes the root, and after a grant (its share grew) sifts it
  -- down again. A scan for the lowest per turn was O(tenants^2) a pass: with tenants.key
  -- service_name a client can make a tenant per service name, and 3,000 of them, one queued
  -- request each, made every allocate and release 0.87 s of Redis.
  local function fair_before(a, b)
    return a.share < b.share or (a.share == b.share and a.t < b.t)
  end
  local function fair_sift(h, i)
    local n = #h
    while true do
      local l, m = 2 * i, i
      if l <= n and fair_before(h[l], h[m]) then m = l end
      if l + 1 <= n and fair_before(h[l + 1], h[m]) then m = l + 1 end
      if m == i then return end
      h[i], h[m] = h[m], h[i]
      i = m
    end
  end

  local function fair_walk(new_id, granted)
    adopt_untenanted()
    -- reserved nodes: node -> {id = holder}; by_tenant: the holder's tenant -> its nodes
    local blocked, failed, by_tenant = {}, {}, {}
    local res = rcall('HGETALL', K_RES)
    -- a holder its quota holds back drops its reservation (not a preemption's hold)
    local holds = (#res > 0 and quotas_on()) and (read_holds() or {}) or nil
    for i = 1, #res, 2 do
      local h = (holds and holds[res[i]] ~= res[i + 1]) and load_req(res[i + 1]) or nil
      if not (h and unreserve_over_quota(h, res[i])) then
        blocked[res[i]] = {id = res[i + 1]}
        local t = rcall('HGET', k_req(res[i + 1]), 'tenant') or ''
        local l = by_tenant[t]
        if not l then l = {}; by_tenant[t] = l end
        l[#l + 1] = res[i]
      end
    end
    -- what a request may not use: every reserved node but its own and those its own tenant's
    -- requests ranked after it hold (its tenant's order is today's order)
    local function lift(r)
      local lifted = nil
      for _, node in ipairs(by_tenant[r.tenant] or {}) do
        local b = blocked[node]
        if b and (b.id == r.id or ranks_before(r.id, b.id)) then
          lifted = lifted or {}
          lifted[node] = b
          blocked[node] = nil
        end
      end
      return lifted
    end
    local may_reserve = RES_AFTER >= 0 and POLICY ~= 'strict_fifo'
    local new_reservations, due = 0, {}
    if may_reserve then
      local waited = rcall('ZRANGEBYSCORE', K_QUNRES, '-inf', ftime(NOW - RES_AFTER))
      for _, id in ipairs(waited) do due[id] = true end
    end
    local tenants = {}
    for _, t in ipairs(rcall('HKEYS', K_TQUEUED)) do
      tenants[#tenants + 1] = {t = t, share = tenant_share(t), pos = 0, head = false}
    end
    -- the first tenant (lowest share) met with a head that cannot go (or holds a reservation)
    local reserver = nil
    -- A pass that stops because nothing fits (or starts so) still lets the lowest-share tenant
    -- with a head reserve for it, as the walk would have: its first eligible exclusive queued
    -- request within SWEEP of where the walk left it (the rank walk's sweep).
    local function sweep()
      if reserver or not may_reserve then return end
      table.sort(tenants, fair_before)
      for _, cur in ipairs(tenants) do
        local r = fair_head(cur.t, cur.pos)
        if r then
          if r.reserved ~= '' then
            if new_wants == nil then new_wants = false end
          elseif r.id == new_id then
            new_wants = true
          else
            if new_wants == nil then new_wants = false end
            if new_reservations < MAX_NEW_RES then reserve(r, blocked) end
          end
          return
        end
      end
    end
    if nothing_fits() then
      sweep()
      return granted
    end
    local maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
    for i = math.floor(#tenants / 2), 1, -1 do fair_sift(tenants, i) end
    while #tenants > 0 do
      local cur = tenants[1]
      local got, done = false, false
      while not got and not done do
        local ids = rcall('ZRANGE', k_tqueue(cur.t), cur.pos, cur.pos + 99)
        if #ids == 0 then break end
        local shapes = rcall('HMGET', K_QSHAPE, unpack(ids))
        for i, id in ipairs(ids) do
          cur.pos = cur.pos + 1
          local shape = shapes[i]
          if shape then
            local sig = string.match(shape, '^(.*)|L[^|]*$') or shape
            local sharing, k, minm = string.match(sig, '^([^|]*)|([^|]*)|([^|]*)|')
            local ok
            if sharing == 'shared' then
              ok = tonumber(minm) <= maxshared
            else
              ok = tonumber(k) <= maxfree
            end
            local r = nil
            if ok and not failed[sig] then
              r = load_req(id)
              if r and deps_done(r) and not over_quota(r) then
                local own = lift(r)
                local node, chosen = place(r, blocked)
                if node then
                  took(r, node, blocked, chosen)
                  grant(r, node, chosen, true, id ~= new_id)
                  granted[#granted + 1] = id
                  got = true
                  -- its own reservation ended with the grant; the others hold again
                  for n, b in pairs(own or {}) do
                    if b.id ~= id then blocked[n] = b end
                  end
                  break
                end
                if own then
                  for n, b in pairs(own) do blocked[n] = b end
                elseif not held_hit then
                  failed[sig] = true
                end
              end
            end
            if POLICY == 'strict_fifo' then
              r = r or load_req(id)
              if not (r and over_quota(r)) then done = true; break end
            elseif may_reserve and (not cur.head or due[id]) then
              r = r or load_req(id)
              if r and r.reserved ~= '' then
                if not cur.head and not reserver then reserver = cur.t end
                cur.head = true
              elseif r and deps_done(r) and not over_quota(r) then
                -- Reservations follow the fair order: only the first tenant (lowest share)
                -- whose head cannot go (or holds a reservation) reserves, its head at once;
                -- a node held for a tenant above its share would serve it ahead of one below.
                -- reservation_after reserves only shared requests (never heads), of that
                -- tenant or of one met before it: an exclusive request becomes its tenant's
                -- head in turn, and one reserving behind its head would go ahead of it.
                -- (bench/fairness.py 24 h, seeds 1/2/3: share_error_max 0.068/0.024/0.026
                -- with every tenant's long-waiting requests reserving, 0.015/0.007/0.012.)
                local want = due[id] and r.sharing == 'shared' and
                  (reserver == nil or reserver == cur.t)
                if not cur.head and r.sharing ~= 'shared' then
                  cur.head = true
                  if reserver == nil then
                    reserver = cur.t
                    want = true
                  end
                end
                if id == new_id then
                  new_wants = want and true or false
                  want = false
                end
                if want and new_reservations < MAX_NEW_RES then
                  local rn = reserve(r, blocked)
                  if rn == '' then
                    may_reserve = false
                  else
                    new_reservations = new_reservations + 1
                    blocked[rn] = {id = id, r = r}
                    local l = by_tenant[r.tenant] or {}
                    by_tenant[r.tenant] = l
                    l[#l + 1] = rn
                  end
                elseif due[id] and r.sharing ~= 'shared' and RES_AFTER > 0 then
                  -- reservation_after never reserves an exclusive one (a head reserves at
                  -- once): it counts again from now, as when no node can take a request, else
                  -- every pass would walk the queue for it (schedule_inner)
                  rcall('ZADD', K_QUNRES, NOW_S, id)
                end
              elseif r and due[id] and RES_AFTER > 0 then
                -- so does one waiting for its dependency or its tenant's max_gpus (the rank
                -- walk's rule in consider())
                rcall('ZADD', K_QUNRES, NOW_S, id)
              end
            elseif due[id] and RES_AFTER > 0 then
              -- a reserve failed earlier in this pass, which ends its reservations: those
              -- two kinds count again from now too (else a head whose reserve fails in every
              -- pass would keep every pass walking for them)
              r = r or load_req(id)
              if r and r.reserved == '' and
                  (r.sharing ~= 'shared' or not deps_done(r) or over_quota(r)) then
                rcall('ZADD', K_QUNRES, NOW_S, id)
              end
            end
          end
        end
        if #ids < 100 then break end
      end
      if got then
        cur.share = tenant_share(cur.t)
        -- the queue's demand indexes still list this pass's grants (flushed at its end), so
        -- this test can only answer "something fits" wrongly: safe
        if nothing_fits() then
          sweep()
          break
        end
        maxfree, maxshared = top_score(K_FREE), top_score(K_SHARED)
      else
        tenants[1] = tenants[#tenants]
        tenants[#tenants] = nil
      end
      fair_sift(tenants, 1)
    end
    return granted
  end

  local function schedule_inner(new_id, force)
    local granted = {}
    if rcall('ZCARD', K_QUEUE) == 0 then return granted end
    local capver = rcall('HGET', K_META, 'capver') or '0'
    local full = force or capver ~= (rcall('HGET', K_META, 'passver') or '')
    if not full and RES_AFTER >= 0 and POLICY ~= 'strict_fifo' then
      local due = low_score(K_QUNRES)
      if due and due <= NOW - RES_AFTER then full = true end
    end
    if not full and new_id and POLICY == 'strict_fifo' and quotas_on() and
        rcall('ZRANK', K_QUEUE, new_id) ~= 0 then
      full = true -- the requests ahead may wait only for their tenants' quotas: walk
    end
    if not full then
      if new_id == nil then
        stat('sched|passes_skipped')
        return granted
      end
      if POLICY == 'strict_fifo' and rcall('ZRANK', K_QUEUE, new_id) ~= 0 then
        return granted
      end
      local r = load_req(new_id)
      if not r or r.status ~= 'queued' or not deps_done(r) or over_quota(r) then
        return granted
      end
      local blocked = {}
      local res = rcall('HGETALL', K_RES)
      -- a preemption's hold is a reservation nobody else may use (no backfill, no spare)
      local holds = #res > 0 and read_holds() or nil
      for i = 1, #res, 2 do
        if holds and holds[res[i]] == res[i + 1] then
          if res[i + 1] ~= new_id then
            blocked[res[i]] = {id = res[i + 1], t = NEVER, spare = 0}
          end
        elseif ranks_before(res[i + 1], new_id) or (TENANT_FAIR == '1' and
            (rcall('HGET', k_req(res[i + 1]), 'tenant') or '') ~= r.tenant) then
          -- with fair share another tenant's reserved node is held back whatever the ranks
          -- (the fair walk's rule)
          local h = quotas_on() and load_req(res[i + 1]) or nil
          if not (h and unreserve_over_quota(h, res[i])) then
            blocked[res[i]] = {id = res[i + 1]}
          end
        end
      end
      local node, chosen = place(r, blocked)
      if node then
        grant(r, node, chosen, true, false)
        granted[1] = new_id
      end
      return granted
    end
    rcall('HSET', K_META, 'passver', capver)
    stat('sched|passes')
    if TENANT_FAIR == '1' then return fair_walk(new_id, granted) end
    local blocked, failed, fail_lease = {}, {}, {}
    local may_reserve = RES_AFTER >= 0 and POLICY ~= 'strict_fifo'
    local new_reservations, head_seen = 0, {}
    local reserved_by, due, possible = {}, {}, {}
    -- tenants with queued requests whose head this pass has not met yet (HEADS only)
    local tenants_left = (may_reserve and HEADS) and math.max(rcall('HLEN', K_QOWNERS),
      rcall('HLEN', K_TQUEUED)) or 0
    -- a reservation made before holds back its node whatever the settings now
    local res = rcall('HGETALL', K_RES)
    for i = 1, #res, 2 do reserved_by[res[i + 1]] = res[i] end
    if may_reserve then
      local waited = rcall('ZRANGEBYSCORE', K_QUNRES, '-inf', ftime(NOW - RES_AFTER))
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
    -- are done and its quota lets it; rank: its place in the queue now). An eligible one that
    -- waited reservation_after reserves; with HEADS so does the first one of each tenant (the
    -- tenant's head) when it is an eligible exclusive request. Its reserved node is held back
    -- from the requests after it.
    local function consider(id, r, eligible, rank)
      local rn = reserved_by[id]
      if rn and not held_node[id] and quotas_on() then
        if r == nil then
          r = load_req(id)
          eligible = r ~= nil and deps_done(r) and not over_quota(r)
        end
        if r and unreserve_over_quota(r, rn) then rn, reserved_by[id] = nil, nil end
      end
      local want = due[id]
      if tenants_left > 0 and rank <= HEAD_SCAN then
        if r == nil then
          r = load_req(id)
          eligible = r ~= nil and deps_done(r) and not over_quota(r)
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
      if HEADS and id == new_id then
        -- reserved by allocate after its queued event (reserve_new)
        new_wants = want and true or false
        want = false
      end
      if not rn and want and may_reserve and new_reservations < MAX_NEW_RES then
        if r == nil then
          r = load_req(id)
          eligible = r ~= nil and deps_done(r) and not over_quota(r)
        end
        -- one waiting for a dependency reserves nothing: it could not run on the node before
        -- its dependency ends, and the node's free GPUs would be held back meanwhile
        if eligible then
          rn = reserve(r, blocked)
          if rn == '' then may_reserve = false else new_reservations = new_reservations + 1 end
        elseif r and due[id] and (not deps_done(r) or over_quota(r)) then
          -- reservation_after counts again from now, as when no node can take it: else every
          -- pass until its dependency ends (or its tenant's max_gpus lets it) would walk the
          -- queue for it (schedule_inner)
          rcall('ZADD', K_QUNRES, NOW_S, id)
        end
      end
      if rn and rn ~= '' and not held_node[id] then blocked[rn] = {id = id, r = r} end
    end

    -- When the walk stops early because nothing fits any more, the heads it did not reach
    -- still reserve: the first SWEEP ranks from `from`, until every tenant's head was met.
    local function sweep(from)
      if not may_reserve or tenants_left <= 0 or from >= SWEEP then return end
      local ids = rcall('ZRANGE', K_QUEUE, from, SWEEP - 1)
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
      local ids = rcall('ZRANGE', K_QUEUE, offset, offset + 499)
      if #ids == 0 then break end
      local removed = 0
      local shapes = rcall('HMGET', K_QSHAPE, unpack(ids))
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
            -- a request its tenant's max_gpus holds back waits (reason quota): it neither
            -- fails its shape nor reserves
            eligible = r ~= nil and deps_done(r) and not over_quota(r)
            local rl = eligible and (r.lease < 0 and NEVER or r.lease)
            if eligible and (hn or rl < (fail_lease[sig] or math.huge)) then
              local hb = hn and blocked[hn]
              if hn then blocked[hn] = nil end
              local node, chosen = place(r, blocked)
              if hn and not node then
                if hold_lapsed(id) then
                  -- its victims are gone and it still does not fit: a plain reservation again
                  rcall('HDEL', k_holds(), hn)
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
          if not placed and POLICY == 'strict_fifo' then
            -- the head blocks, unless only its tenant's quota holds it back
            r = r or load_req(id)
            if not (r and over_quota(r)) then return granted end
          elseif not placed then
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
