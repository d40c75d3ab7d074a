--[[
  schedule: one schedule pass (see schedule() in includes/prelude.lua for the rules and costs).

  KEYS[1], ARGV[1..2]: the common block (includes/prelude.lua).
  Returns: the records granted, in grant order.
]]
-- @include prelude
return records(schedule(nil))
