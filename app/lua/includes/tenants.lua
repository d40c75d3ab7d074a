--[[
  tenants: who pays for the GPUs (tenants.* and preemption.* in the settings). Every record
  carries its tenant (field `tenant`, resolved by the engine from the principal or the
  service_name per tenants.key; '' on records written before tenants existed: those are
  never counted).

  State, kept by the scripts that grant, end, queue and dequeue:
    K_TENANTS  tenant -> GPUs held now (a shared allocation counts as one GPU); no field at 0.
               One HINCRBY per grant and per end: the allocate/release path pays no more.
    k_tusage() tenant -> "<usage>|<at>": usage in GPU-seconds decayed with TENANT_HALF_LIFE
               as of time <at>, kept while fair share is on (its one reader). Exact for any
               clock: between two changes of held it grows by held * integral of
               2^(-(now - s) / half-life) ds. A tenant holding nothing whose usage decayed
               below USAGE_FORGET has no field (the reaper sweeps them), so the hash is
               bounded by the fleet, not by the names clients send.
    K_TQUEUED  tenant -> requests queued (no field at 0).
    k_tqueue(t) the tenant's queued requests, scored as in K_QUEUE (its own queue order; the
               fair-share pass walks these).
  TENANT_LIMITS is "1" when some tenant may have a max_gpus or max_queued: without, no quota
  is read on any path.

  Helpers other includes call (all cheap; quotas parsed once per call):
    tenant_quota(t)      {weight, guaranteed, max_gpus (nil = none), max_queued (nil = none)}
    tenant_held(t)       GPUs t holds now
    tenant_usage(t)      held, decayed usage in GPU-seconds as of NOW (accrues with fair share)
    tenant_queued(t)     requests t has queued
    alloc_gpus(r)        GPUs a request counts for: 1 when shared, else r.k
    over_quota(r)        true when granting r now would take its tenant past max_gpus
    quotas_on()          whether any tenant may have a max_gpus
    tenants_on()         whether tenants are configured (fair_share, or tenants.quotas): the
                         rules that change the scheduler's order for everyone (each tenant's
                         head reserves at once, spare GPUs) apply only then
    tenant_share(t)      (usage in GPU-hours + held) / weight: the fair-share order, lowest first
    tenant_add(t, n)     held += n (n < 0 on an end), usage brought to NOW; grant/finish_alloc
    tenant_queue_add(t, n)  queued += n; enqueue/dequeue
    tenant_sweep(count)  the reaper: forget idle tenants whose usage decayed
]]

local LN2 = 0.69314718055994531 -- math.log(2); the library's load runs without math
-- a tenant holding nothing is forgotten once its decayed usage is below this (GPU-seconds):
-- so the hash is bounded by the fleet (sum of decayed usage <= GPUs x half-life / ln 2), not
-- by the names clients send
local USAGE_FORGET = 60

local tq_cache, tq_map, tq_default = nil, nil, nil -- per call (reset by begin_call)

local function quota_of(v)
  local m, q = tonumber(v[3]), tonumber(v[4])
  return {weight = tonumber(v[1]), guaranteed = tonumber(v[2]),
    max_gpus = (m and m >= 0) and m or nil, max_queued = (q and q >= 0) and q or nil}
end

local function tenant_quota(t)
  if not tq_cache then tq_cache = {} end
  local q = tq_cache[t]
  if q then return q end
  if TENANT_QUOTAS ~= '' then
    if not tq_map then tq_map = cjson.decode(TENANT_QUOTAS) end
    local v = tq_map[t]
    if v then q = quota_of(v) end
  end
  if not q then
    if not tq_default then
      local v = {}
      for x in string.gmatch(TENANT_DEFAULT, '[^|]+') do v[#v + 1] = x end
      tq_default = quota_of(v)
    end
    q = tq_default
  end
  tq_cache[t] = q
  return q
end

local function decayed(u, held, dt)
  if dt <= 0 then return u end
  local d = math.pow(2, -dt / TENANT_HALF_LIFE)
  return u * d + held * (1 - d) * TENANT_HALF_LIFE / LN2
end

local function tenant_held(t)
  return tonumber(rcall('HGET', K_TENANTS, t) or '0') or 0
end

-- a usage entry "<usage>|<at>" -> usage, at
local function usage_of(v)
  local a = string.find(v, '|', 1, true)
  return tonumber(string.sub(v, 1, a - 1)) or 0, tonumber(string.sub(v, a + 1)) or NOW
end

-- held, usage (GPU-seconds, decayed as of NOW; it accrues while fair share is on)
local function tenant_usage(t)
  local held = tenant_held(t)
  local v = rcall('HGET', k_tusage(), t)
  if not v then return held, 0 end
  local u, at = usage_of(v)
  return held, decayed(u, TENANT_FAIR == '1' and held or 0, NOW - at)
end

local function tenant_queued(t)
  return tonumber(rcall('HGET', K_TQUEUED, t) or '0') or 0
end

local function alloc_gpus(r)
  if r.sharing == 'shared' then return 1 end
  return r.k
end

local function over_quota(r)
  if TENANT_LIMITS ~= '1' or r.tenant == '' then return false end
  local m = tenant_quota(r.tenant).max_gpus
  return m ~= nil and tenant_held(r.tenant) + alloc_gpus(r) > m
end

-- Whether any tenant may have a max_gpus (a quota or the default's).
local function quotas_on()
  return TENANT_LIMITS == '1'
end

-- Tenants configured: tenants.fair_share on, or tenants.quotas not empty. Without (the
-- defaults) the queue is today's one priority queue (issue 14): reservations only after
-- reservation_after, as before tenants existed.
local function tenants_on()
  return TENANT_FAIR == '1' or TENANT_QUOTAS ~= ''
end

local function tenant_share(t)
  local held, u = tenant_usage(t)
  return (u / 3600 + held) / tenant_quota(t).weight
end

-- held += n. The allocate/release path pays one HINCRBY (and an HDEL when the tenant's last
-- allocation ends); usage is brought to NOW only when fair share is on, its one reader.
local function tenant_add(t, n)
  if not t or t == '' then return end -- nil, or false: an HMGET of a record without one
  local after = rcall('HINCRBY', K_TENANTS, t, n == 1 and '1' or n == -1 and '-1' or n)
  if after <= 0 then
    rcall('HDEL', K_TENANTS, t)
    after = 0
  end
  if TENANT_FAIR ~= '1' then return end
  local before = after - n
  if before < 0 then before = 0 end
  local uk = k_tusage()
  local v = rcall('HGET', uk, t)
  local u = 0
  if v then
    local u0, at = usage_of(v)
    u = decayed(u0, before, NOW - at)
  end
  if after == 0 and u < USAGE_FORGET then
    if v then rcall('HDEL', uk, t) end
  else
    rcall('HSET', uk, t, fnum(u) .. '|' .. NOW_S)
  end
end

local function tenant_queue_add(t, n)
  if t == nil or t == '' or n == 0 then return end
  if rcall('HINCRBY', K_TQUEUED, t, n) <= 0 then rcall('HDEL', K_TQUEUED, t) end
end

-- The reaper: forget up to `count` idle tenants (nothing held, usage decayed below
-- USAGE_FORGET); an HSCAN cursor in meta (tenant_cursor) moves through the hash over calls.
local function tenant_sweep(count)
  local cur = rcall('HGET', K_META, 'tenant_cursor') or '0'
  local uk = k_tusage()
  local page = rcall('HSCAN', uk, cur, 'COUNT', count)
  local forgot = 0
  local kv = page[2]
  for i = 1, #kv, 2 do
    local held, u = tenant_usage(kv[i])
    if held <= 0 and u < USAGE_FORGET then
      rcall('HDEL', uk, kv[i])
      forgot = forgot + 1
    end
  end
  if page[1] ~= cur then rcall('HSET', K_META, 'tenant_cursor', page[1]) end
  return forgot
end
