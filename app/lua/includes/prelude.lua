--[[
  prelude: the pieces every engine function shares.

  Loaded once as the Redis Functions library engine.LIBRARY (app/engine.py, library_source): these
  includes at the top, then one function per app/lua/<command>.lua, each starting with
  begin_call (includes/call.lua), which binds the per-call names below. Every function takes:
    KEYS     the fixed keys, in the order of engine.FIXED_KEYS (all under the prefix's hash tag;
             keys derived at run time use the same prefix, so the engine stays one slot):
      K_NODES K_FREE K_SIZES K_GPUS K_SHARED K_QUEUE K_QDX K_QDS K_QDEAD K_QUNRES K_RES K_LEASES
      K_EVENTS K_OUTBOX K_STATS K_META K_QSHAPE K_SVCLABELS K_QOWNERS K_TENANTS
      K_TQUEUED: nodes, nodes_free, node_sizes, gpus, shared_capacity, queue,
      queue_demand:exclusive, queue_demand:shared, queue_deadlines, queue_unreserved,
      reservations, leases, events, webhook_outbox, stats, meta, queue_shapes, stats_services,
      queue_owners, tenants, tenant_queued (includes/tenants.lua)
    K_CHANGES, the changes Pub/Sub channel (a channel, not a key), is derived from the prefix
    (engine.CHANNELS) when the prefix differs from the last call's.
    ARGV[1]  one argument (each costs ~1k instructions per call), lines joined by newlines,
             parsed only when it differs from the last call's: the library version the caller
             expects (a mismatch answers {-11, version}: the caller loads its library and
             retries), "1" when ARGV[2] is now (epoch seconds, a clock the caller injected)
             else "" (no ARGV[2]: Redis TIME, one clock for every replica), then the
             scheduler settings in the order of engine.SETTINGS, then the key prefix (the
             rest of the string), for the key builders k_node(n) k_gpu(n, i) k_req(id)
             k_deps(id) k_svc(s) k_idem(k) k_free(n) k_tqueue(t) (node, gpu, request,
             dependents, service, idempotency, node_free_gpus, queue_tenant; concatenation,
             no string.format). The settings:
      POLICY (best_effort|strict_fifo)  AGING (priority points per second)
      RES_AFTER (s; < 0 = off)  HB_TIMEOUT (s)  FORGET_AFTER (s; <= 0 = never)  EV_MAX
      HIST_TTL (s; HIST_TTL_S: whole seconds, as a string)  MAX_QUEUE  MAX_OWNER (queued
      requests per owner)  MAX_SVC_LABELS (services with their own stats label)
      TENANT_FAIR ("1" = tenants.fair_share)  TENANT_HALF_LIFE (s)  TENANT_QUOTAS (JSON
      {tenant: [weight, guaranteed, max_gpus, max_queued]}, -1 = no limit; "" = none)
      TENANT_DEFAULT ("weight|guaranteed|max_gpus|max_queued")  TENANT_LIMITS ("1" = some
      max_gpus or max_queued)  TENANT_KEY (principal|service_name, tenants.key as resolved)
      PREEMPT ("1" = enabled)  PREEMPT_GRACE (s)
    Each function's own arguments start at ARGV[A + 1] (A: 2 with a clock's now, else 1).
  MAX_LEASE (s; the longest lease there is) and MAX_SHARED (shared allocations one GPU holds
  at most; request_rules.MAX_SHARED_PER_GPU) are literals of the library.

  Errors are returned, not raised: { negative code, details... } (see ERRORS in app/engine.py).

  GPU hash fields owned by the engine (the monitor owns the telemetry fields):
    excl      id of the exclusive allocation holding it ("" = none)
    shared_n  number of shared allocations on it;  shared_mb  MB they reserve
    cordoned  "1" when an admin made it unschedulable;  lost  "1" when its node stopped reporting it
    in_free   "1" while counted in nodes_free and listed in the node's node_free_gpus hash
    in_busy   "1" while allocated (exclusive holder or shared holders)
  meta gpus_out: GPUs with neither flag (unusable and unheld); counts.lua derives the allocated
  GPUs as every GPU less the free ones (nodes_free) less these.
  Node hash fields an admin owns: cordoned "1" (GPUs the node reports later arrive cordoned),
  draining "1" (cordoned, waiting for its allocations to end).
]]
-- @constants
local rcall -- redis.call, bound by begin_call (includes/call.lua)
-- set per call by begin_call (includes/call.lua); NOW_SEC: TIME's seconds, nil with a clock
-- the caller passed
local NOW, NOW_S, NOW_SEC

-- tonumber with a memo. The same few strings come back call after call (a request's
-- defaults, a GPU's free memory), and tonumber of a string costs two strtod (~1k
-- instructions); a hit is one table read. The memo outlives the call (a library's locals do)
-- and is bounded: it starts again empty past MEMO_MAX entries.
local MEMO_MAX = 4096
local num_memo, num_n = {}, 0
local function num(s)
  local v = num_memo[s] -- first: a hit costs no type() (a C call, ~600 instructions)
  if v == nil then
    if type(s) ~= 'string' then return tonumber(s) end
    v = tonumber(s) or false
    if num_n >= MEMO_MAX then num_memo, num_n = {}, 0 end
    num_memo[s], num_n = v, num_n + 1
  end
  return v or nil
end

local function ftime(x) return string.format('%.6f', x) end
local function fnum(x) return string.format('%.17g', x) end

-- A lease as sent or stored -> seconds, -1 = no expiry. Never endless by accident: anything
-- that is not a number, NaN, or longer than MAX_LEASE (inf included) becomes MAX_LEASE, so
-- every expiry is a finite, representable time whatever a record holds.
local function lease_secs(x)
  x = num(x)
  if x == nil or x ~= x or x > MAX_LEASE then return MAX_LEASE end
  if x < 0 then return -1 end
  return x
end

-- the queue's functions, built on first use in a call (includes/queue.lua)
local queue, queue_fns
