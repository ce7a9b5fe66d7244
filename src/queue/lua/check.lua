--[[
  cogrelay: what the scripts check before their first write (put in front
  of add.lua, add_routed.lua, claim.lua, finish.lua, release.lua,
  stalled.lua, retry_failed.lua and remove.lua). Redis does not undo a script's writes
  when it fails midway: an add that failed after some of its writes kept
  jobs without their dedup record (a resend delivered them again), or
  dedup records of jobs in no list (a resend was answered "duplicate" and
  the event never delivered); a script that took a job out of one list and
  failed to put it in the next left it in none (never delivered, never
  listed). A queue whose keys a tool (or another program on the same
  names) broke is refused first.
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

-- Why `whose` queue cannot be written, if one of `keys` ({key, type}
-- pairs) holds another type than BullMQ's, else nil. A script that moves
-- jobs checks the lists and sets it may put them in before it takes any.
local function cgWrongType(keys, whose)
  for _, k in ipairs(keys) do
    local t = redis.call("TYPE", k[1])["ok"]
    if t ~= "none" and t ~= k[2] then
      return whose .. "'s key " .. k[1] .. " is a " .. t .. ", not a " .. k[2] ..
        " (another program on these names?): rename or delete it"
    end
  end
  return nil
end

-- Why `whose` queue (key prefix `prefix`) cannot take jobs, if a key the
-- adds write holds another type than BullMQ's, else nil.
local function cgBrokenKeys(prefix, whose)
  return cgWrongType({ { prefix .. "wait", "list" }, { prefix .. "active", "list" },
    { prefix .. "events", "stream" }, { prefix .. "marker", "zset" },
    { prefix .. "waiting-children", "zset" } }, whose)
end

-- The last of `n` new ids, `top` as the counter's INCRBY answered it, past
-- every id given before: a counter a tool set back or deleted is brought
-- up to the last id given (kept in `mark`, the base queue's `cg:lastid`),
-- as ids name one job over every destination's queue. Called at a script's
-- first INCRBY (the later ones are past it), before its first job is
-- written, it sets the mark to that INCRBY's top; `cgMarkIds` raises it to
-- the script's last id as it ends (ids a script that fails midway gave
-- after its first INCRBY are past the counter's value, not the mark's).
-- (A mark that is not a whole number a counter can hold, or of another
-- type, is read as none, and replaced.)
local function cgPastIds(mark, counter, top, n)
  local last = tonumber(redis.pcall("GET", mark))
  if not last or last ~= math.floor(last) or last < 0 or last >= 2 ^ 53 then
    last = 0
  end
  if top - n < last then
    top = last + n
    redis.call("SET", counter, string.format("%d", top))
  end
  redis.call("SET", mark, string.format("%d", top))
  return top
end

-- The mark raised to `top`, the script's last id, if it gave ids past
-- `marked` (the mark `cgPastIds` set).
local function cgMarkIds(mark, top, marked)
  if top and top > marked then
    redis.call("SET", mark, string.format("%d", top))
  end
end

-- Id `id` for a new job of the queue at `prefix`, or the counter's next ones
-- while a job already has it (with `cgPastIds`, for a counter and its mark
-- both set back): an add would have written over a stored job's hash (its
-- event merged away).
local function cgFreeId(prefix, counter, id)
  local jobId = string.format("%d", id)
  while redis.call("EXISTS", prefix .. jobId) == 1 do
    jobId = string.format("%d", redis.call("INCR", counter))
  end
  return jobId
end
