--[[
  renew: extend a live allocation's lease to now + lease seconds (a preempting one's never past
  its preempt_at).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] lease seconds ("" = the allocation's own lease, < 0 = no expiry)
  ARGV[A+3] principal   ARGV[A+4] "1" when admin
  Returns: {1, record} or {-1} unknown, {-2} not the owner, {-3, status} not live.
]]
-- @include prelude
local id, lease, principal, admin = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
local rk = k_req(id)
local f = rcall('HMGET', rk, 'status', 'owner', 'lease_seconds', 'service_name',
  'preempt_at')
if not f[1] then return {-1} end
if principal ~= '' and admin ~= '1' and (f[2] or '') ~= principal then return {-2} end
if f[1] ~= 'allocated' and f[1] ~= 'preempting' then return {-3, f[1]} end
local secs = lease_secs(lease ~= '' and lease or f[3])
local expires, score = '', '+inf'
if secs >= 0 then
  expires = ftime(NOW + secs)
  score = expires
end
if f[1] == 'preempting' then
  -- notice was given: no renewal reaches past preempt_at (includes/preemption.lua)
  expires, score = capped_lease(expires, tonumber(f[5]) or NOW)
end
rcall('HSET', rk, 'expires_at', expires, 'lease_seconds', fnum(secs), 'renewed_at', NOW_S)
rcall('ZADD', K_LEASES, score, id)
event('renewed', id, f[4], {'expires_at', expires})
return {1, record(id)}
