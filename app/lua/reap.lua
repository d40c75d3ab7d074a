--[[
  reap: expire allocations past expires_at (a preempting one at its preempt_at ends as
  preempted) and time out queued requests past their deadline,
  forget nodes silent for longer than scheduler.node_forget_after, then run a schedule pass for
  the capacity that freed.

  KEYS, ARGV[1..A]: the common block (fixed keys, now, version, prefix, settings: prelude.lua).
  ARGV[A+1] most of each kind to end in one call
  Returns: {expired ids, timed-out ids, granted records, forgotten nodes, lost allocation ids,
  preempted ids}
  Guarantees: when a node goes silent, the holders of its allocations get one gpu_unhealthy
  notice (every GPU lost) per silence; a forgotten node's allocations end as lost
  (includes/nodes.lua, forget_node).
]]
-- @include prelude
-- @include nodes
local limit = tonumber(ARGV[A + 1])
local due = rcall('ZRANGEBYSCORE', K_LEASES, '-inf', NOW_S, 'LIMIT', 0, limit)
local expired, preempted = {}, {}
for _, id in ipairs(due) do
  local status = due_status(id)
  local list = status == 'preempted' and preempted or expired
  list[#list + 1] = id
  finish_alloc(id, status)
end
local timed_out, leaving = {}, {}
for _, id in ipairs(rcall('ZRANGEBYSCORE', K_QDEAD, '-inf', NOW_S, 'LIMIT', 0, limit)) do
  -- a mode-ok dependent of one timed out before it in this list was cancelled by that
  -- (fail_dependents): ending it again would count it out of the queue twice
  local st = rcall('HGET', k_req(id), 'status')
  if not st or st == 'queued' then
    timed_out[#timed_out + 1] = id
    finish_queued(id, 'timed_out', leaving)
  end
end
-- the timed-out (and those cancelled with them) leave their dependencies' sets, per set
-- (1,000 with 64 dependencies each, alternating runs: 210-272 ms of Redis for this reap one
-- SREM at a time, 154-177 ms so)
leave_deps(leaving)
-- a node that just went silent: its GPUs are lost to their holders (one notice per silence;
-- report_node clears the mark when the node reports again)
for _, node in ipairs(rcall('ZRANGEBYSCORE', K_NODES, '-inf',
    '(' .. ftime(NOW - HB_TIMEOUT), 'LIMIT', 0, 100)) do
  local nk = k_node(node)
  if rcall('HGET', nk, 'silence_told') ~= '1' then
    rcall('HSET', nk, 'silence_told', '1')
    local affected, ids = {}, {}
    for _, id in ipairs(allocs_on(node, nil)) do
      local gpus = {}
      for _, i in ipairs(cjson.decode(rcall('HGET', k_req(id), 'gpu_ids') or '[]')) do
        gpus[#gpus + 1] = {index = i, health = 'lost'}
      end
      affected[id] = gpus
      ids[#ids + 1] = id
    end
    notify_unhealthy(node, affected, ids)
  end
end
local forgotten, lost = {}, {}
if FORGET_AFTER > 0 then
  local silent = rcall('ZRANGEBYSCORE', K_NODES, '-inf', '(' .. ftime(NOW - FORGET_AFTER),
    'LIMIT', 0, 10)
  for _, node in ipairs(silent) do
    forgotten[#forgotten + 1] = node
    for _, id in ipairs(forget_node(node, 'system', 'silent')) do lost[#lost + 1] = id end
  end
end
tenant_sweep(64)
return {expired, timed_out, records(schedule(nil)), forgotten, lost, preempted}
