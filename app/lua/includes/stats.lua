--[[
  stats: the counters (the stats hash, meta's gpus_out), the queue-wait histogram,
  the bounded service labels and each owner's share of the queue.
  Guarantees: inside a pass the counters are buffered and written once per field
  (stat_flush); no service name grows the stats hash past MAX_SVC_LABELS labels.
]]

local WAIT_BUCKETS = {'0.005', '0.01', '0.025', '0.05', '0.1', '0.25', '0.5', '1', '2.5', '5',
  '10', '30', '60', '120', '300', '600', '1800', '3600'}

-- Counters (the stats hash, and meta's gpus_out). Inside a schedule pass they are
-- summed in Lua and written once per field at the end of the pass (a pass granting 1,000
-- requests writes a handful of fields, not 6,000). Nothing reads them during a script.
local stat_buf, meta_buf = nil, nil
local function stat(field, n)
  if stat_buf then
    stat_buf[field] = (stat_buf[field] or 0) + (n or 1)
  else
    rcall('HINCRBY', K_STATS, field, n or '1')
  end
end

local function meta_incr(field, n)
  if meta_buf then
    meta_buf[field] = (meta_buf[field] or 0) + n
  else
    rcall('HINCRBY', K_META, field, n == 1 and '1' or n == -1 and '-1' or n)
  end
end

local function stat_flush()
  if not stat_buf then return end
  for field, n in pairs(stat_buf) do
    if field == 'wait|sum' then
      rcall('HINCRBYFLOAT', K_STATS, field, string.format('%.6f', n))
    else
      rcall('HINCRBY', K_STATS, field, n)
    end
  end
  for field, n in pairs(meta_buf) do
    if n ~= 0 then rcall('HINCRBY', K_META, field, n) end
  end
  stat_buf, meta_buf = nil, nil
end

-- One grant's queue wait (only for grants from the queue). The histogram's count is every
-- grant (the alloc|*|allocated counters), so only the bucket and the sum are written here. An immediate grant waited 0 s: Engine.stats() counts it in the
-- first bucket, which saves the hot path a write.
local function stat_wait(wait)
  local label = '+Inf'
  for _, b in ipairs(WAIT_BUCKETS) do
    if wait <= tonumber(b) then label = b; break end
  end
  stat('wait|le|' .. label)
  if wait > 0 then
    if stat_buf then
      stat_buf['wait|sum'] = (stat_buf['wait|sum'] or 0) + wait
    else
      rcall('HINCRBYFLOAT', K_STATS, 'wait|sum', string.format('%.6f', wait))
    end
  end
end

-- The service part of an ``alloc|<service>|<status>`` stats field: the service's own name for
-- the first MAX_SVC_LABELS services ever counted (kept in K_SVCLABELS), 'other' past them, so
-- no number of service names grows the stats hash or /metrics without bound.
local svc_labels = {}
local function svc_label(svc)
  svc = svc or ''
  local v = svc_labels[svc]
  if v == nil then
    if rcall('SISMEMBER', K_SVCLABELS, svc) == 1 then
      v = svc
    elseif rcall('SCARD', K_SVCLABELS) < MAX_SVC_LABELS then
      rcall('SADD', K_SVCLABELS, svc)
      v = svc
    else
      v = 'other'
    end
    svc_labels[svc] = v
  end
  return v
end

-- Count one request of service svc in alloc|<label>|<status>. Outside a pass: one HINCRBY
-- when that field exists already (a field alloc|<s>|<status> is only ever created for a
-- service s that is a label, or for the label 'other', which is where s's count goes anyway),
-- and the label set is consulted only when the increment created the field. That increment
-- leaves svc_labels alone: an entry there would cost the next call a new table (begin_call),
-- ~3.8k instructions per allocate + release, against one SISMEMBER for a later pass of this
-- call that counts svc again.
local function stat_alloc(svc, status)
  svc = svc or ''
  local label = svc_labels[svc]
  if stat_buf or label then
    stat('alloc|' .. (label or svc_label(svc)) .. '|' .. status)
    return
  end
  local field = 'alloc|' .. svc .. '|' .. status
  if rcall('HINCRBY', K_STATS, field, '1') > 1 then return end
  label = svc_label(svc)
  if label ~= svc then
    rcall('HDEL', K_STATS, field)
    rcall('HINCRBY', K_STATS, 'alloc|' .. label .. '|' .. status, '1')
  end
end

-- Whose share of the queue a request counts against (K_QOWNERS field): its owner (the API
-- key's principal), or its service when auth is off and there is no owner.
local function owner_bucket(owner, svc)
  if owner and owner ~= '' then return 'o:' .. owner end
  return 's:' .. (svc or '')
end

-- n more (fewer) queued requests of bucket, in tenant ('' = a record from before tenants). An
-- owner's ('o:' bucket) are also counted by tenant in k_qotenants(owner), whose counts add up
-- to its K_QOWNERS field (GET /gpu/tenants of a non-admin reads it instead of the queue): it
-- goes with that field, and its first request clears what a release without it left there.
local function owner_count(bucket, n, tenant)
  local left = rcall('HINCRBY', K_QOWNERS, bucket, n)
  if left <= 0 then rcall('HDEL', K_QOWNERS, bucket) end
  if string.sub(bucket, 1, 2) ~= 'o:' then return end
  local k = k_qotenants(string.sub(bucket, 3))
  if left <= 0 or left == n then rcall('DEL', k) end
  if left > 0 and rcall('HINCRBY', k, tenant, n) <= 0 then rcall('HDEL', k, tenant) end
end
