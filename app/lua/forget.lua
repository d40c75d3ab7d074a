--[[
  forget: an admin forgets a node that is not alive (see includes/nodes.lua, forget_node).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] node   ARGV[A+2] principal ("" = auth off)
  Returns: {1, ids of the allocations that ended as lost, number granted}, {-1} unknown node,
  {-3, "alive"} the node still reports (cordon or drain it instead).
  Guarantees: an alive node is never forgotten; after the call no index names the node.
]]
-- @include prelude
-- @include nodes
local node, by = ARGV[A + 1], ARGV[A + 2]
if not rcall('ZSCORE', K_NODES, node) then return {-1} end
if node_alive(node) then return {-3, 'alive'} end
local lost = forget_node(node, by, 'admin')
local granted = schedule(nil)
return {1, lost, #granted}
