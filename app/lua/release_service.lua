--[[
  release_service: end every live allocation of one service (only the principal's own unless
  admin) in one atomic step, then run a schedule pass. A preempting one ends as preempted.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] service name   ARGV[A+2] principal ("" = auth off)   ARGV[A+3] "1" when admin
  Returns: {1, released records, number granted} or {-1} when it had none to release.
]]
-- @include prelude
local svc, principal, admin = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local done = {}
for _, id in ipairs(rcall('SMEMBERS', k_svc(svc))) do
  local f = rcall('HMGET', k_req(id), 'status', 'owner')
  local live = f[1] == 'allocated' or f[1] == 'preempting'
  if live and (principal == '' or admin == '1' or (f[2] or '') == principal) then
    finish_alloc(id, f[1] == 'allocated' and 'released' or 'preempted', nil, true)
    done[#done + 1] = id
  elseif not f[1] then
    rcall('SREM', k_svc(svc), id)
  end
end
if #done == 0 then return {-1} end
table.sort(done)
local granted = schedule(nil)
return {1, records(done), #granted}
