--[[
  schedule: one schedule pass (see schedule() in includes/prelude.lua for the rules and costs).

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] "1": walk the queue even if no capacity appeared since the last pass (a safety
            net against capacity the version missed); "0": skip when nothing changed.
  Returns: the records granted, in grant order.
]]
-- @include prelude
return records(schedule(nil, ARGV[A + 1] == '1'))
