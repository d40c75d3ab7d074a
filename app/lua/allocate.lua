--[[
  allocate: place a request now, or queue it, in one atomic step (enqueue + schedule pass).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id             ARGV[A+2] idempotency key ("" = none)
  with a key: ARGV[A+3] request hash   ARGV[A+4] idempotency ttl (s)
  then (from ARGV[A+3] without a key, ARGV[A+5] with one) the new record's fields: name,
            value, name, value, ... (strings; lists and dicts as JSON; a field at its default,
            app/record.py, is not sent and not stored; queue_timeout_seconds is always sent)
  Returns:
    "position|submitted_at|grant"  the new request, as one string (each element of a
        function's reply costs the server ~2.4k instructions): the caller already holds the
        fields it sent; position 0 and the grant's fields when granted,
        "status|node|expires_at|allocated_at|wait_time_seconds|gpu_ids|gpu_uuids" (a field not
        stored is empty; the uuids last, whatever they hold; a node name has no '|'),
        position >= 1 and an empty grant when queued
    {2, record JSON, position}  an idempotent replay of an earlier request
    errors: {-4, existing id} idempotency key reused with another body, {-7, dep} unknown
    depends_on id, {-10, dep, status} depends_on_mode ok on a dependency that already ended
    otherwise than released, {-6, reason, limit} can never fit (reason no_gpus,
    required_gpus, min_memory_mb, preferred_gpus (an index beyond the largest node),
    gpu_model, nodes, no_node, or max_gpus: more than its tenant may hold), {-5, depth} queue
    full, {-9, queued, limit} the owner already has MAX_OWNER requests queued, {-12, queued,
    limit, tenant} the tenant already has its max_queued queued, {-8} id taken.
  Guarantees: the request is granted at once only if no higher-ranked waiting request could
  use the GPUs (the pass tries those first) and its tenant stays within max_gpus; otherwise it
  is queued. A full queue, an owner at its share (MAX_OWNER; the owner is the principal, else
  the service), or a tenant at its max_queued rejects only requests that would wait. No writes on error (other than grants the pass made for others):
  a rejected request leaves no record, counter or stats field behind.
]]
-- @include prelude
local id, idem_key = ARGV[A + 1], ARGV[A + 2]
local idem_hash, idem_ttl, at = '', 0, A + 3 -- at: the first field's name
if idem_key ~= '' then idem_hash, idem_ttl, at = ARGV[A + 3], tonumber(ARGV[A + 4]), A + 5 end

if idem_key ~= '' then
  local v = rcall('GET', k_idem(idem_key))
  if v then
    local oid, ohash = split_member(v)
    if rcall('EXISTS', k_req(oid)) == 1 then
      if ohash ~= idem_hash then return {-4, oid} end
      local rank = rcall('ZRANK', K_QUEUE, oid)
      return {2, record(oid), rank and rank + 1 or 0}
    end
  end
end

-- the fields sent (those at their default are not: REC_DEFAULTS answers for them)
local f = setmetatable({}, REC_DEFAULTS_MT)
for i = at, #ARGV, 2 do f[ARGV[i]] = ARGV[i + 1] end
local svc = f.service_name

-- dependencies: each must exist; with mode ok, none may have ended otherwise than released,
-- and those still queued or live learn of this request (fail_dependents in the prelude)
local waits_on = {}
if f.depends_on ~= '[]' then
  for _, dep in ipairs(cjson.decode(f.depends_on)) do
    local st = rcall('HGET', k_req(dep), 'status')
    if not st then return {-7, dep} end
    if f.depends_on_mode == 'ok' then
      if st == 'queued' or st == 'allocated' or st == 'preempting' then
        waits_on[#waits_on + 1] = dep
      elseif st ~= 'released' then
        return {-10, dep, st}
      end
    end
  end
end

local k, minm = num(f.required_gpus), num(f.min_memory_mb)
local pat, nodes_raw = f.gpu_pattern or '', f.nodes or '[]'

local plain = f.sharing ~= 'shared' and f.preferred_gpus == '[]'
local reject = nil
if not plain then
  reject = never(f, k, minm, pat, nodes_raw)
  if reject then return reject end
end
-- the tenant's max_gpus: a request that alone exceeds it can never be granted
local tenant = f.tenant or ''
local tquota = (TENANT_LIMITS == '1' and tenant ~= '') and tenant_quota(tenant) or nil
if tquota and tquota.max_gpus and (f.sharing == 'shared' and 1 or k) > tquota.max_gpus then
  return (plain and never(f, k, minm, pat, nodes_raw)) or {-6, 'max_gpus', tostring(tquota.max_gpus)}
end
local depth = rcall('ZCARD', K_QUEUE)
local rk = k_req(id)
if rcall('EXISTS', rk) == 1 then return (plain and never(f, k, minm, pat, nodes_raw)) or {-8} end

local submitted = NOW_S
-- from TIME, NOW is tonumber(NOW_S) already (not so for a clock the caller passed: it is
-- printed to the microsecond). Its status is set on r, not on f (f's hash part would grow).
local r = req_from(id, f, A == 1 and NOW or tonumber(submitted))
r.status = 'queued'

if depth == 0 and deps_done(r) and not over_quota(r) then
  -- no node is held back here (EMPTY: no table made per call)
  local node, chosen = place(r, EMPTY, 1)
  if node then
    remember_idem(idem_key, id, idem_hash, idem_ttl)
    -- the record is written once, by the grant (one HSET, with the grant's fields)
    local expires, ids, uuids, alloc_at, waited = grant(r, node, chosen, false, false, ARGV, at)
    return '0|' .. submitted .. '|allocated|' .. node .. '|' .. expires .. '|' ..
      (alloc_at or '') .. '|' .. (waited or '') .. '|' .. ids .. '|' .. uuids
  end
end
if plain then
  reject = never(f, k, minm, pat, nodes_raw)
  if reject then return reject end
end
remember_idem(idem_key, id, idem_hash, idem_ttl)
local bucket = owner_bucket(f.owner, svc)

-- status first, as a grant writes it (one write of the field)
rcall('HSET', rk, 'status', 'queued', 'id', id, 'submitted_at', submitted, unpack(ARGV, at))
queue().enqueue(r, tonumber(f.queue_timeout_seconds))
schedule(id)
local rank = rcall('ZRANK', K_QUEUE, id)
-- the owner's other queued requests, after the pass (which may have granted some of them)
local mine = rank and (tonumber(rcall('HGET', K_QOWNERS, bucket) or '1') or 1) - 1 or 0
-- and the tenant's (tenants.*.max_queued)
local tlimit = tquota and tquota.max_queued
local tmine = (rank and tlimit) and tenant_queued(tenant) - 1 or 0
if rank and (depth >= MAX_QUEUE or mine >= MAX_OWNER or (tlimit and tmine >= tlimit)) then
  -- it would wait, and the queue is full or the owner has its share: undo (nothing about it
  -- was announced yet but a `reserved` event: with reservation_after 0 and no tenants
  -- configured the pass may have reserved a node for it, and that node is given back)
  queue().dequeue(id, rcall('HGET', rk, 'reserved_node') or '', r.sharing, bucket, r.tenant)
  rcall('DEL', rk)
  if idem_key ~= '' then rcall('DEL', k_idem(idem_key)) end
  if depth >= MAX_QUEUE then return {-5, tostring(depth)} end
  if mine >= MAX_OWNER then return {-9, tostring(mine), tostring(MAX_OWNER)} end
  return {-12, tostring(tmine), tostring(tlimit), tenant}
end
if rank then
  for _, dep in ipairs(waits_on) do
    rcall('SADD', k_deps(dep), id)
    rcall('HSET', k_req(dep), 'ok_dependents', '1')
  end
  event('queued', id, svc, nil)
  stat_alloc(svc, 'queued')
  queue().reserve_new(id)
  -- a tenant below its guarantee may preempt for it (includes/preemption.lua); with no grace
  -- period the victims ended already and a pass may place it now
  if PREEMPT == '1' and preempt_for_guarantees(id, false) > 0 and PREEMPT_GRACE <= 0 then
    schedule(nil, true)
    rank = rcall('ZRANK', K_QUEUE, id)
  end
  if rank then return (rank + 1) .. '|' .. submitted .. '|' end
end
local v = rcall('HMGET', rk, 'status', 'node', 'expires_at', 'allocated_at', 'wait_time_seconds',
  'gpu_ids', 'gpu_uuids')
-- a field not stored is '' (allocated_at and the wait of a grant at submission: the reader
-- fills them in, app/record.py)
return '0|' .. submitted .. '|' .. (v[1] or '') .. '|' .. (v[2] or '') .. '|' .. (v[3] or '') ..
  '|' .. (v[4] or '') .. '|' .. (v[5] or '') .. '|' .. (v[6] or '[]') .. '|' .. (v[7] or '[]')
