--[[
  cogrelay: puts back in wait the jobs whose relay died: a job in active
  whose lock expired (no lock key), as BullMQ's moveStalledJobsToWait does
  for a worker's stalled jobs (its lock is set in the same step as the job
  enters active, by BullMQ's scripts and ours, so one look suffices). The
  attempt is not counted (atm is unchanged); the stall is ("stc").
    KEYS[1] active, KEYS[2] wait, KEYS[3] stalled, KEYS[4] meta,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix
  Then a hundred of the jobs parked behind their ordered key's first
  (`order.lua`, put in front of this script), the next hundred at each call
  (`cg:sweepAt` keeps the place: the score and id of the last one looked
  at, so that jobs leaving the set before it do not make the next call skip
  any; earlier versions kept theirs in `cg:sweep`, and while both run
  each goes on from its own), are looked at: a key whose first job a tool
  deleted lets its next job go (else the key's last events would wait for
  an event that may never come), and a parked job missing from its key's
  list (a tool deleted the list) goes back at the list's end. So are the
  hundred oldest held keys
  (`cg:held`): one whose failed first job is gone (a tool cleaned the failed
  jobs) or was retried is no longer held (it leaves the set), and its next
  job goes.
  Returns {how many jobs went back, nil or why a look stopped (a key a
  tool made another type: the jobs put back stay in wait)}.
]]
local rcall = redis.call
local broken = cgWrongType({ { KEYS[2], "list" }, { KEYS[5], "zset" }, { KEYS[6], "stream" } },
  "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to put back the jobs of a relay that died")
end
local moved = {}
for _, jobId in ipairs(rcall("LRANGE", KEYS[1], 0, -1)) do
  local jobKey = ARGV[1] .. jobId
  if rcall("EXISTS", jobKey .. ":lock") == 0 then
    if rcall("LREM", KEYS[1], 1, jobId) > 0 then
      -- (BullMQ's stalled set, which cogrelay does not read: one a tool
      -- made another type is left alone)
      redis.pcall("SREM", KEYS[3], jobId)
      if rcall("EXISTS", jobKey) == 1 then
        -- (a count a tool made a text is left: the job must reach wait)
        redis.pcall("HINCRBY", jobKey, "stc", 1)
        rcall("RPUSH", KEYS[2], jobId)
        rcall("XADD", KEYS[6], "*", "event", "stalled", "jobId", jobId)
        rcall("XADD", KEYS[6], "*", "event", "waiting", "jobId", jobId, "prev", "active")
        moved[#moved + 1] = jobId
      end
    end
  end
end
-- (a meta a tool made another type is not paused: the jobs are in wait)
if #moved > 0 and redis.pcall("HGET", KEYS[4], "paused") == false then
  rcall("ZADD", KEYS[5], 0, "0")
end
-- The sweeps, after the moves: a key a tool made another type stops the
-- look at that job or key only (the first such error is answered, and
-- logged), never the moves before them (Redis would keep them and answer
-- an error) nor the other keys' looks.
local stopped = false
local MAXLOOK = 1000
local function try(f, ...)
  local ok, err = pcall(f, ...)
  if not ok and not stopped then
    stopped = "the ordered keys' sweep: " .. (type(err) == "table" and err.err or tostring(err))
  end
end
local function sweepParked(prefix, jobId)
  -- (a job whose hash a tool replaced is skipped: gone, for `cgHead`)
  local key = redis.pcall("HGET", prefix .. jobId, "cg:ok")
  if type(key) ~= "string" then
    return
  end
  local chain = prefix .. "cg:ok:" .. key
  -- Parked outside its key's list (a tool deleted the list, or the list
  -- was of another type and deleted to mend it): it goes at the list's end,
  -- else it would wait for a promotion that never comes. Looked for in a
  -- list of at most MAXLOOK ids only: a held key's list grows with its
  -- backlog, and LPOS reads it from the start at each parked job (one that
  -- a tool deleted holds at first only the jobs put back since).
  local n = rcall("LLEN", chain)
  if n == 0 or (n <= MAXLOOK and not rcall("LPOS", chain, jobId)) then
    rcall("RPUSH", chain, jobId)
  end
  cgPromote(prefix, chain)
end
local function sweepHeld(prefix, key)
  local chain = prefix .. "cg:ok:" .. key
  local head = cgHead(prefix, chain)
  if not head or not rcall("ZSCORE", prefix .. "failed", head) then
    rcall("ZREM", prefix .. "cg:held", key)
    cgPromote(prefix, chain)
  end
end
-- Whether id a sorts before id b as Redis orders the members of equal
-- score: byte by byte (Lua's `<` follows the server's locale).
local function bytesBefore(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end
-- The rank the sweep goes on from: just after the last job it looked at,
-- or, that job gone, where it would be (a cursor, not a rank kept: the
-- set shrinks as parked jobs are promoted). None, or a place a tool broke:
-- from the start.
local function resume(set, cursor)
  local space = type(cursor) == "string" and string.find(cursor, " ", 1, true)
  local from = space and string.sub(cursor, 1, space - 1)
  if not (from and tonumber(from)) then
    return 0
  end
  local id = string.sub(cursor, space + 1)
  local rank = rcall("ZRANK", set, id)
  if rank then
    return rank + 1
  end
  local before = redis.pcall("ZCOUNT", set, "-inf", "(" .. from)
  local same = redis.pcall("ZRANGEBYSCORE", set, from, from, "LIMIT", 0, MAXLOOK)
  if type(before) ~= "number" or type(same) ~= "table" or same.err then
    return 0
  end
  for _, other in ipairs(same) do
    if bytesBefore(other, id) then
      before = before + 1
    end
  end
  return before
end
local parked, held = {}, {}
try(function()
  local set = ARGV[1] .. "waiting-children"
  local from = resume(set, redis.pcall("GET", ARGV[1] .. "cg:sweepAt"))
  local page = rcall("ZRANGE", set, from, from + 99, "WITHSCORES")
  -- In the order they were accepted, as jobs missing from their key's list
  -- go back into it: by id as a number (ids come from one counter; the
  -- score is the adding relay's clock, and the jobs of one add share it,
  -- which Redis orders by id as text: "10" before "2"), then by score.
  local found = {}
  for i = 1, #page, 2 do
    found[#found + 1] = { page[i], tonumber(page[i + 1]) or 0 }
  end
  -- (an id that is not a finite number, a tool's, goes after the others)
  local function num(id)
    local v = tonumber(id)
    if v and v == v and v ~= math.huge and v ~= -math.huge then
      return v
    end
    return nil
  end
  table.sort(found, function(a, b)
    local x, y = num(a[1]), num(b[1])
    if x and y and x ~= y then
      return x < y
    end
    if (x ~= nil) ~= (y ~= nil) then
      return x ~= nil
    end
    if a[2] ~= b[2] then
      return a[2] < b[2]
    end
    return a[1] < b[1]
  end)
  for i, p in ipairs(found) do
    parked[i] = p[1]
  end
  if #parked < 100 then
    rcall("DEL", ARGV[1] .. "cg:sweepAt")
  else
    rcall("SET", ARGV[1] .. "cg:sweepAt", page[#page] .. " " .. page[#page - 1])
  end
end)
for _, jobId in ipairs(parked) do
  try(sweepParked, ARGV[1], jobId)
end
try(function()
  held = rcall("ZRANGE", ARGV[1] .. "cg:held", 0, 99)
end)
for _, key in ipairs(held) do
  try(sweepHeld, ARGV[1], key)
end
return { #moved, stopped }
