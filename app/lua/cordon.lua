--[[
  cordon: an admin cordons a node, or one GPU of it, or clears that (uncordon); drain is a
  node cordon that also marks the node draining. Allocations on cordoned GPUs stay.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] node   ARGV[A+2] GPU index ("" = the whole node)   ARGV[A+3] "1" cordon / "0" clear
  ARGV[A+4] "1" drain (whole node only)   ARGV[A+5] principal ("" = auth off)
  ARGV[A+6] drain only: grace seconds of the notice each live allocation on the node gets
            before it is preempted ("" = none is preempted: they end when their holders
            release them or their leases run out)
  Returns: {1, node or GPU hash, number granted, ids of the allocations marked preempting} or
  {-1} unknown node or GPU.
  Guarantees: a node cordon covers the GPUs it reports later too; an uncordon of the node
  clears every GPU's cordon and the draining mark (allocations already preempting stay so);
  each change is one event naming the principal.
]]
-- @include prelude
-- @include nodes
local node, idx, cordon, drain, by = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3] == '1',
  ARGV[A + 4] == '1', ARGV[A + 5]
local grace = tonumber(ARGV[A + 6] or '')
local flag = cordon and '1' or '0'

local function set_gpu(i)
  local gk = k_gpu(node, i)
  if rcall('HGET', gk, 'cordoned') ~= flag then
    rcall('HSET', gk, 'cordoned', flag)
    gpu_sync(node, i)
    return true
  end
  return false
end

local out
if idx ~= '' then
  local gk = k_gpu(node, idx)
  if rcall('EXISTS', gk) == 0 then return {-1} end
  if set_gpu(idx) then
    event(cordon and 'gpu_cordoned' or 'gpu_uncordoned', '', '',
      {'node', node, 'gpu_index', idx, 'by', by})
  end
  out = rcall('HGETALL', gk)
else
  local nk = k_node(node)
  if rcall('EXISTS', nk) == 0 then return {-1} end
  for _, i in ipairs(node_indexes(node)) do set_gpu(i) end
  local was = rcall('HMGET', nk, 'cordoned', 'draining')
  local draining = (cordon and drain) and '1' or (cordon and (was[2] or '0') or '0')
  rcall('HSET', nk, 'cordoned', flag, 'draining', draining)
  local name = cordon and (drain and 'node_draining' or 'node_cordoned') or 'node_uncordoned'
  if was[1] ~= flag or (drain and was[2] ~= '1') then
    event(name, '', '', {'node', node, 'by', by})
  end
  out = rcall('HGETALL', nk)
end
local preempted = {}
if cordon and drain and idx == '' and grace then
  for _, id in ipairs(allocs_on(node, nil)) do
    if preempt_alloc(id, grace, 'drain', by, '') then preempted[#preempted + 1] = id end
  end
end
local granted = schedule(nil)
return {1, out, #granted, preempted}
