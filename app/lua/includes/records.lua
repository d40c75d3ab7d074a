--[[
  records: a request's record as one JSON string, for replies.
]]

-- A record as one JSON object string (one reply element instead of fifty).
local function record(id)
  local h = rcall('HGETALL', k_req(id))
  local t = {}
  for i = 1, #h, 2 do t[h[i]] = h[i + 1] end
  return cjson.encode(t)
end

local function records(ids)
  local out = {}
  for i, id in ipairs(ids) do out[i] = record(id) end
  return out
end
