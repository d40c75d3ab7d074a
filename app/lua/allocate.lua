--[[
  allocate: place a request now, or queue it, in one atomic step (enqueue + schedule pass).

  KEYS, ARGV[1..13]: the common block (includes/prelude.lua).
  ARGV[A+1] id             ARGV[A+2] idempotency key ("" = none)
  ARGV[A+3] request hash   ARGV[A+4] idempotency ttl (s)
  ARGV[A+5] queue timeout (s)
  ARGV[A+6..] field, value pairs of the new record (strings, JSON for lists and dicts)
  Returns: {1, record, position} (position 0 when not queued), {2, record, position} for an
  idempotent replay, or an error: {-4, existing id} idempotency key reused with another body,
  {-7, dep} unknown depends_on id, {-6, reason, limit} can never fit, {-5, depth} queue full,
  {-8} id already taken.
  Guarantees: the request is granted at once only if no higher-ranked waiting request could
  use the GPUs (the pass tries those first); otherwise it is queued. No partial writes on error.
]]
-- @include prelude
local id, idem_key, idem_hash = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local idem_ttl, queue_timeout = tonumber(ARGV[A + 4]), tonumber(ARGV[A + 5])

local function answer(code, rid)
  local pos = 0
  local rank = redis.call('ZRANK', K_QUEUE, rid)
  if rank then pos = rank + 1 end
  return {code, record(rid), pos}
end

if idem_key ~= '' then
  local v = redis.call('GET', k_idem(idem_key))
  if v then
    local oid, ohash = split_member(v)
    if redis.call('EXISTS', k_req(oid)) == 1 then
      if ohash ~= idem_hash then return {-4, oid} end
      return answer(2, oid)
    end
  end
end

local f = {}
for i = A + 6, #ARGV, 2 do f[ARGV[i]] = ARGV[i + 1] end
local svc = f.service_name

for _, dep in ipairs(cjson.decode(f.depends_on or '[]')) do
  if redis.call('EXISTS', k_req(dep)) == 0 then return {-7, dep} end
end

local k, minm = tonumber(f.required_gpus), tonumber(f.min_memory_mb)
local reject = nil
if redis.call('ZCARD', K_GPUS) == 0 then
  reject = {-6, 'no_gpus', '0'}
else
  local biggest_node = top_score(K_SIZES)
  local biggest_gpu = top_score(K_GPUS)
  if k > biggest_node then
    reject = {-6, 'required_gpus', tostring(biggest_node)}
  elseif minm > biggest_gpu then
    reject = {-6, 'min_memory_mb', tostring(biggest_gpu)}
  end
end
if reject then
  stat('alloc|' .. svc .. '|rejected')
  return reject
end
local depth = redis.call('ZCARD', K_QUEUE)
if depth >= MAX_QUEUE then
  stat('alloc|' .. svc .. '|rejected')
  return {-5, tostring(depth)}
end
if redis.call('EXISTS', k_req(id)) == 1 then return {-8} end

local rk = k_req(id)
local pairs_ = {}
for i = A + 6, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', rk, 'id', id, 'status', 'queued', 'submitted_at', ftime(NOW), unpack(pairs_))
if idem_key ~= '' then
  redis.call('SET', k_idem(idem_key), id .. '|' .. idem_hash, 'EX', math.floor(idem_ttl))
end
local r = load_req(id)

if depth == 0 and deps_done(r) then
  local node, chosen = place(r, {})
  if node then
    grant(r, node, chosen, false)
    return answer(1, id)
  end
end

enqueue(r, queue_timeout)
schedule(id)
if redis.call('HGET', rk, 'status') == 'queued' then
  event('queued', id, svc, nil)
  stat('alloc|' .. svc .. '|queued')
end
return answer(1, id)
