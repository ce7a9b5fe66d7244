--[[
  cogrelay: what the add and claim scripts check before their first write
  (put in front of add.lua, add_routed.lua and claim.lua). Redis does not
  undo a script's writes when it fails midway: an add that failed after
  some of its writes kept jobs without their dedup record (a resend
  delivered them again), or dedup records of jobs in no list (a resend was
  answered "duplicate" and the event never delivered). A queue whose keys a
  tool (or another program on the same names) broke is refused first.
]]

-- The limit in `value` (the meta's `concurrency`; false when unset: no
-- limit), or nil and why `whose` queue takes nothing: a value that is not a
-- finite number would fail the script midway or, NaN or infinite, lift or
-- freeze the limit unseen. A fraction counts up, as the claims count it.
local function cgLimit(value, whose)
  if not value then
    return false
  end
  local limit = tonumber(value)
  if limit and limit == limit and limit ~= math.huge and limit ~= -math.huge then
    return math.ceil(limit)
  end
  return nil, whose .. " has a concurrency of \"" .. string.sub(value, 1, 40) ..
    "\" in its meta, not a number: set a number (or delete the field)"
end

-- Why `whose` queue (key prefix `prefix`) cannot take jobs, if a key the
-- adds write holds another type than BullMQ's, else nil.
local cgKinds = { { "wait", "list" }, { "active", "list" }, { "events", "stream" },
  { "marker", "zset" }, { "waiting-children", "zset" } }
local function cgBrokenKeys(prefix, whose)
  for _, k in ipairs(cgKinds) do
    local key, kind = k[1], k[2]
    local t = redis.call("TYPE", prefix .. key)["ok"]
    if t ~= "none" and t ~= kind then
      return whose .. "'s key " .. prefix .. key .. " is a " .. t .. ", not a " .. kind ..
        " (another program on these names?): rename or delete it"
    end
  end
  return nil
end
