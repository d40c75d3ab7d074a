--[[
  set_schedulable: an admin cordons a GPU (no new grants; its allocations stay) or clears that.

  KEYS[1], ARGV[1]: the common block (includes/prelude.lua).
  ARGV[A+1] node   ARGV[A+2] index   ARGV[A+3] "1" schedulable / "0" cordoned
  Returns: {1, gpu hash, number granted} or {-1} unknown GPU.
]]
-- @include prelude
local node, idx, on = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local gk = k_gpu(node, idx)
if redis.call('EXISTS', gk) == 0 then return {-1} end
local cordoned = on == '1' and '0' or '1'
if redis.call('HGET', gk, 'cordoned') ~= cordoned then
  redis.call('HSET', gk, 'cordoned', cordoned)
  gpu_sync(node, idx)
  event(on == '1' and 'gpu_uncordoned' or 'gpu_cordoned', '', '',
    {'node', node, 'gpu_index', idx})
end
local granted = schedule(nil)
return {1, redis.call('HGETALL', gk), #granted}
