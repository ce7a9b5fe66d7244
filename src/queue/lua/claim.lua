--[[
  cogrelay: takes up to ARGV[4] jobs for processing, in BullMQ's layout: per job
  what BullMQ's moveToActive does (promote due delayed jobs, honour pause, the
  global concurrency and the global rate limit, take from wait then from
  prioritized, lock, emit "active", count the start in "ats").
    KEYS[1] wait, KEYS[2] active, KEYS[3] prioritized, KEYS[4] events,
    KEYS[5] rate limiter, KEYS[6] delayed, KEYS[7] meta, KEYS[8] priority
    counter, KEYS[9] marker
    ARGV[1] key prefix, ARGV[2] timestamp (ms), ARGV[3] lock duration (ms),
    ARGV[4] most jobs, ARGV[5] token base, ARGV[6] worker name,
    ARGV[7] order: "due" (the queue's) or "trials" (a circuit's round: with
    room for two or more, the job with the most attempts made, then never
    attempted first, newest first; of the newest hundred in wait),
    ARGV[8] trials of a shared circuit's round
  Returns {jobs, next, probe, paused, circuit}: jobs is flat, 5 per job (id,
  token, data, atm, and "1" when it has an ordered key (`cg:ok`), else "0"); next is the earliest due time of a delayed job (ms)
  when no job was taken, or when the global rate limit held some back, when
  its window frees; else nil; probe is the cool-down in force (ms) when the
  jobs taken are the shared circuit's trials, else 0; paused is 1 when the
  queue is paused (the relay then rests its claims until a resume shows),
  else 0; circuit is, while the shared circuit holds the queue, how long
  until its next trial (ms, on Redis's clock), else nil.
]]
local rcall = redis.call
local prefix, ts = ARGV[1], tonumber(ARGV[2])
local eventsKey, delayedKey, markerKey = KEYS[4], KEYS[6], KEYS[9]
local meta = rcall("HMGET", KEYS[7], "paused", "concurrency", "max", "duration",
  "cg:openUntil", "cg:probeUntil", "cg:cooldown")
local paused = meta[1] and true or false
local pausedFlag = paused and 1 or 0
local room = tonumber(ARGV[4])
local limit, why = cgLimit(meta[2], "the queue")
-- The lists a job is moved into (active, from wait or prioritized; wait or
-- prioritized, from delayed), and the events and marker written after a
-- move, before the first move.
why = why or cgWrongType({ { KEYS[2], "list" }, { KEYS[1], "list" }, { KEYS[3], "zset" },
  { eventsKey, "stream" }, { markerKey, "zset" }, { delayedKey, "zset" } }, "the queue")
if why then
  return redis.error_reply("ERR " .. why .. " to deliver its jobs")
end
if limit then
  room = math.min(room, limit - rcall("LLEN", KEYS[2]))
end

-- A promoted job keeps when it fell due ("cg:due", from its score: due <<
-- 12 | n): in wait it is aged from then, not from its creation.
local due = rcall("ZRANGEBYSCORE", delayedKey, 0, (ts + 1) * 0x1000 - 1, "WITHSCORES",
  "LIMIT", 0, 1000)
if #due > 0 then
  local ids = {}
  for i = 1, #due, 2 do
    ids[#ids + 1] = due[i]
  end
  rcall("ZREM", delayedKey, unpack(ids))
  -- (every one taken off delayed above must reach wait: a job's hash or
  -- the priority counter a tool made another type is read as none)
  for i = 1, #due, 2 do
    local jobId = due[i]
    local jobKey = prefix .. jobId
    local priority = tonumber(redis.pcall("HGET", jobKey, "priority")) or 0
    if priority ~= priority or priority == math.huge or priority == -math.huge then
      priority = 0
    end
    if priority == 0 then
      rcall("LPUSH", KEYS[1], jobId)
    else
      local c = redis.pcall("INCR", KEYS[8])
      if type(c) ~= "number" then
        c = 0
      end
      rcall("ZADD", KEYS[3], priority * 0x100000000 + c % 0x100000000, jobId)
    end
    rcall("XADD", eventsKey, "*", "event", "waiting", "jobId", jobId, "prev", "delayed")
    redis.pcall("HSET", jobKey, "delay", 0, "cg:due", math.floor(tonumber(due[i + 1]) / 0x1000))
  end
  if not paused and room > 0 then
    rcall("ZADD", markerKey, "0", "0")
  end
end

local maxJobs = tonumber(meta[3])
local limitMs = tonumber(meta[4])
if maxJobs and limitMs then
  local used = tonumber(rcall("GET", KEYS[5]) or 0)
  if used >= maxJobs then
    local pttl = rcall("PTTL", KEYS[5])
    if pttl > 0 then
      return {{}, ts + pttl, 0, pausedFlag}
    end
    -- Expiring this millisecond (or left without an expiry): a new window.
    rcall("DEL", KEYS[5])
    used = 0
  end
  room = math.min(room, maxJobs - used)
end

-- cogrelay's circuit breaker, shared by every relay (not BullMQ's), on
-- Redis's own clock (TIME), so relays' clocks do not matter: while open
-- nothing is taken; once its cool-down is over, one claim takes a round of
-- trials (the freshest jobs) and the others wait for their results (or
-- their leases).
local probe = false
local fresh = ARGV[7] == "trials"
local openUntil = tonumber(meta[5])
local clock = 0
if openUntil then
  local t = rcall("TIME")
  clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if clock < openUntil then
    return {{}, false, 0, pausedFlag, openUntil - clock}
  end
  local probeUntil = tonumber(meta[6])
  if probeUntil and clock < probeUntil then
    return {{}, false, 0, pausedFlag, probeUntil - clock}
  end
  room = math.min(room, tonumber(ARGV[8]))
  probe = true
  fresh = true
end

local jobs = {}
local n = 0
-- The ids to take: a round of trials from the newest hundred (wait's
-- head), or the queue's own order (wait's tail, then prioritized).
local picked = {}
if not paused and room > 0 and fresh then
  local firsts, others = {}, {}
  local most, mostAtm = nil, 0
  for _, id in ipairs(rcall("LRANGE", KEYS[1], 0, 99)) do
    if string.sub(id, 1, 2) ~= "0:" then
      local atm = tonumber(redis.pcall("HGET", prefix .. id, "atm")) or 0
      if atm == 0 then
        firsts[#firsts + 1] = id
      else
        others[#others + 1] = id
        if atm > mostAtm then
          most, mostAtm = id, atm
        end
      end
    end
  end
  local function pick(id)
    if #picked < room then
      rcall("LREM", KEYS[1], 1, id)
      rcall("LPUSH", KEYS[2], id)
      picked[#picked + 1] = id
    end
  end
  -- The most retried first only with room for another: with room for one,
  -- a never-attempted job goes first, and the most retried still comes
  -- after (it is the only one due, with CONCURRENCY=1, say).
  local tookMost = false
  if most and room >= 2 then
    pick(most)
    tookMost = true
  end
  for _, list in ipairs({firsts, others}) do
    for _, id in ipairs(list) do
      if not (tookMost and id == most) then
        pick(id)
      end
    end
  end
end
local function nextId()
  if fresh then
    n = n + 1
    return picked[n]
  end
  if n >= room then
    return nil
  end
  local jobId = rcall("RPOPLPUSH", KEYS[1], KEYS[2])
  if jobId and string.sub(jobId, 1, 2) == "0:" then
    rcall("LREM", KEYS[2], 1, jobId)
    jobId = rcall("RPOPLPUSH", KEYS[1], KEYS[2])
  end
  if not jobId then
    local p = rcall("ZPOPMIN", KEYS[3])
    if #p == 0 then
      rcall("DEL", KEYS[8])
      return nil
    end
    jobId = p[1]
    rcall("LPUSH", KEYS[2], jobId)
  end
  n = n + 1
  return jobId
end
if not paused then
  while true do
    local jobId = nextId()
    if not jobId then
      break
    end
    local jobKey = prefix .. jobId
    -- (a job's hash a tool made another type is as gone as a removed one)
    local f = redis.pcall("HMGET", jobKey, "data", "atm", "ats", "cg:ok")
    if f.err then
      f = {}
    end
    if f[1] then
      if maxJobs and limitMs and rcall("INCR", KEYS[5]) == 1 then
        rcall("PEXPIRE", KEYS[5], math.floor(math.abs(limitMs)))
      end
      local token = string.format("%s:%d", ARGV[5], n)
      rcall("SET", jobKey .. ":lock", token, "PX", ARGV[3])
      rcall("XADD", eventsKey, "*", "event", "active", "jobId", jobId, "prev", "waiting")
      rcall("HMSET", jobKey, "processedOn", ARGV[2], "pb", ARGV[6], "ats",
        string.format("%d", (tonumber(f[3]) or 0) + 1))
      jobs[#jobs + 1] = jobId
      jobs[#jobs + 1] = token
      jobs[#jobs + 1] = f[1]
      jobs[#jobs + 1] = f[2] or "0"
      jobs[#jobs + 1] = f[4] and "1" or "0"
    else
      -- An id whose job was removed: drop it rather than deliver nothing
      -- (or hold up every claim after it).
      rcall("LREM", KEYS[2], -1, jobId)
    end
  end
end
if probe and #jobs > 0 then
  -- The others wait for these trials' results (or their leases).
  rcall("HSET", KEYS[7], "cg:probeUntil", clock + tonumber(ARGV[3]))
  return {jobs, false, tonumber(meta[7]) or 1, pausedFlag}
end
if #jobs > 0 then
  rcall("ZADD", markerKey, "0", "0")
  -- Held back by the global rate limit: when its window frees the next job.
  if maxJobs and limitMs and n >= room then
    local pttl = rcall("PTTL", KEYS[5])
    if pttl > 0 then
      return {jobs, ts + pttl, 0, pausedFlag}
    end
  end
  return {jobs, false, 0, pausedFlag}
end
local first = rcall("ZRANGE", delayedKey, 0, 0, "WITHSCORES")
if first[2] then
  return {jobs, math.floor(tonumber(first[2]) / 0x1000), 0, pausedFlag}
end
return {jobs, false, 0, pausedFlag}
