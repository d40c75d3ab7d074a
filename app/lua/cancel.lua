--[[
  cancel: withdraw a queued request; requests that depended on it may now be granted.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] id   ARGV[A+2] principal ("" = auth off)   ARGV[A+3] "1" when admin
  Returns: {1, record, number granted} or {-1} unknown, {-2} not the owner,
  {-3, status} not queued.
]]
-- @include prelude
local id, principal, admin = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local f = rcall('HMGET', k_req(id), 'status', 'owner')
if not f[1] then return {-1} end
if principal ~= '' and admin ~= '1' and (f[2] or '') ~= principal then return {-2} end
if f[1] ~= 'queued' then return {-3, f[1]} end
finish_queued(id, 'cancelled')
local granted = schedule(nil)
return {1, record(id), #granted}
