--[[
  cogrelay: a queue's global concurrency (`concurrency` in its meta, as
  BullMQ's setGlobalConcurrency writes it), read safely; put in front of
  add.lua, add_routed.lua and claim.lua.
]]

-- The limit in `value` (the meta field; false when unset: no limit), or nil
-- and why `whose` queue takes nothing: a tool's value that is not a finite
-- number would fail the script midway (Redis keeps the writes made before)
-- or, NaN or infinite, lift or freeze the limit unseen.
local function cgLimit(value, whose)
  if not value then
    return false
  end
  local limit = tonumber(value)
  if limit and limit == limit and limit ~= math.huge and limit ~= -math.huge then
    return limit
  end
  return nil, whose .. " has a concurrency of \"" .. string.sub(value, 1, 40) ..
    "\" in its meta, not a number: set a number (or delete the field)"
end
