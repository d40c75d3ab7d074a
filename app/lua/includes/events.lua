--[[
  events: the events stream, the webhook outbox, long-poll wake-ups (Pub/Sub)
  and the capacity version.
  Guarantees: an event is appended to the capped stream before its webhook is queued, so
  every delivery names an event id.
]]

-- The queue's length, read at most once while nothing enters or leaves the queue (enqueue and
-- dequeue forget it, as begin_call does): a release's bump_capacity and schedule share one ZCARD.
local qlen
local function queue_len()
  if qlen == nil then qlen = rcall('ZCARD', K_QUEUE) end
  return qlen
end

-- Capacity appeared (a GPU freed, a node back, a dependency done, a reservation dropped): the
-- next pass walks the whole queue again (meta.capver, includes/pass.lua). With the queue empty
-- nobody waits to be told: a request queued later is tried against the capacity of then as the
-- pass's new request (only allocate enqueues), so the version stays (one write less per release).
local function bump_capacity()
  if queue_len() > 0 then rcall('HINCRBY', K_META, 'capver', '1') end
end

-- Append one event to the capped stream; returns its entry id. Every TRIM_EVERY-th append
-- trims (MAXLEN ~ EV_MAX, as approximate as before: the stream may pass EV_MAX by fewer than
-- TRIM_EVERY entries plus a partly filled stream node), the others only append: the trim's
-- check and its three arguments cost a grant or release ~3.5k server instructions each time.
-- The count lives in the library (its locals outlive calls); a reload starts it again.
local TRIM_EVERY, appended = 32, 0
local function event(name, id, svc, extra)
  appended = appended + 1
  if appended < TRIM_EVERY then
    if extra then
      return rcall('XADD', K_EVENTS, '*', 'event', name, 'request_id', id or '',
        'service_name', svc or '', 'ts', NOW_S, unpack(extra))
    end
    return rcall('XADD', K_EVENTS, '*', 'event', name, 'request_id', id or '',
      'service_name', svc or '', 'ts', NOW_S)
  end
  appended = 0
  if extra then
    return rcall('XADD', K_EVENTS, 'MAXLEN', '~', EV_MAX, '*', 'event', name,
      'request_id', id or '', 'service_name', svc or '', 'ts', NOW_S, unpack(extra))
  end
  return rcall('XADD', K_EVENTS, 'MAXLEN', '~', EV_MAX, '*', 'event', name,
    'request_id', id or '', 'service_name', svc or '', 'ts', NOW_S)
end

-- event() of a grant or an ending, with its node and GPU ids (and a grant's uuids) as
-- arguments: no table to build and unpack on the hot path. The trimming append goes through
-- event().
local function event_gpus(name, id, svc, node, ids, uuids)
  if appended + 1 >= TRIM_EVERY then
    return event(name, id, svc, uuids and {'node', node, 'gpu_ids', ids, 'gpu_uuids', uuids}
      or {'node', node, 'gpu_ids', ids})
  end
  appended = appended + 1
  if uuids then
    return rcall('XADD', K_EVENTS, '*', 'event', name, 'request_id', id, 'service_name', svc,
      'ts', NOW_S, 'node', node, 'gpu_ids', ids, 'gpu_uuids', uuids)
  end
  return rcall('XADD', K_EVENTS, '*', 'event', name, 'request_id', id, 'service_name', svc,
    'ts', NOW_S, 'node', node, 'gpu_ids', ids)
end

-- Queue a webhook delivery when the record has a URL and (for non-grant events) opted in.
-- pinned: fields as they were at the event, which a later change (a renewal) must not alter
-- in the payload (every try of one event sends the same body). extra: more fields for the
-- entry (gpu_unhealthy names the node and the GPUs), or nil.
local function outbox(name, id, event_id, url, events_json, always, pinned, extra)
  if not url or url == '' then return end -- false: an HMGET of a field not stored
  if not always then
    local ok = false
    for _, e in ipairs(cjson.decode(events_json or '[]')) do
      if e == name then ok = true end
    end
    if not ok then return end
  end
  local entry = {event_id = event_id, event = name, request_id = id, ts = NOW, pinned = pinned}
  if extra then
    for k, v in pairs(extra) do entry[k] = v end
  end
  rcall('RPUSH', K_OUTBOX, cjson.encode(entry))
end

-- Wake the API calls long-polling this request (app/longpoll.py): one PUBLISH per status
-- change of a request that someone may be waiting on (a queued request leaving the queue, a
-- live allocation ending or changing state). Redis delivers it after the script, so a waiter
-- that wakes reads the new status. Without subscribers a PUBLISH costs one dictionary lookup.
local function notify(id, status)
  rcall('PUBLISH', K_CHANGES, id .. '|' .. status)
end
