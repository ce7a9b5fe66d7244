--[[
  cogrelay: adds a batch of jobs in BullMQ's layout. Per job it does what
  BullMQ's addStandardJob does for a job with a deduplication id and TTL; a job
  with a lock token goes straight to active, locked, as if a worker had taken it
  from wait at once (a handoff to the adding relay's own worker pool).
    KEYS[1] wait, KEYS[2] active, KEYS[3] meta, KEYS[4] id, KEYS[5] events,
    KEYS[6] marker
    ARGV[1] key prefix, ARGV[2] timestamp (ms), ARGV[3] dedup TTL (ms),
    ARGV[4] job name, ARGV[5] worker name,
    then 8 per job: dedup id (the event key), data (JSON), opts (JSON),
    lock token or "", lock duration (ms) of a locked job, for an event
    that may share its key with another (`Event::key_sharer`) its botId and
    its own record, else "" and "", and how long its dedup record lasts
    (ms: ARGV[3], or more for an envelope dated ahead of now)
  An event whose key's record holds another botId is another event, with a
  record of its own (`dedup.lua`, put in front of this script).
  Returns per job {kind, jobId}: "a" added to wait, "l" added locked,
  "d" a duplicate of jobId.
]]
local rcall = redis.call
local prefix, ts, ttl, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local eventsKey = KEYS[5]
local meta = rcall("HMGET", KEYS[3], "paused", "concurrency", "max", "cg:openUntil")
-- A tool's concurrency that is not a number: refused before any write (Redis
-- does not undo a script's writes when it fails midway).
local limit, why = cgLimit(meta[2], "the queue")
if why then
  return redis.error_reply("ERR " .. why .. " to take its events")
end
local broken = cgBrokenKeys(prefix, "the queue")
if broken then
  return redis.error_reply("ERR " .. broken)
end
local maxEvents = rcall("HGET", KEYS[3], "opts.maxLenEvents")
if not maxEvents then
  maxEvents = 10000
  rcall("HSET", KEYS[3], "opts.maxLenEvents", maxEvents)
end
-- (a tool's length that XADD would refuse midway: BullMQ's default instead)
local n = tonumber(maxEvents)
if not n or n < 0 or n ~= math.floor(n) or n == math.huge then
  maxEvents = 10000
end
local pausedOrMaxed = meta[1] and true or false
-- How many jobs may go straight to active: none while paused or under a
-- global rate limit (those go through the limiter in claim.lua), at most the
-- room left under the global concurrency, else any (-1).
local lockRoom = -1
if limit then
  local room = limit - rcall("LLEN", KEYS[2])
  if room <= 0 then
    pausedOrMaxed = true
  end
  lockRoom = math.max(room, 0)
end
-- No handoff under a global rate limit or while the shared circuit is open.
if pausedOrMaxed or meta[3] or meta[4] then
  lockRoom = 0
end
local out = {}
-- Ids for the whole batch at once (as BullMQ, a duplicate uses up an id too).
-- Each job is pushed to wait or active as it is written: should the script
-- fail at a later job (a tool's dedup record of another type), the jobs
-- before it are whole, and their resends are duplicates of jobs that go
-- out (pushed at the end, they stayed in no list, named by their records).
local perJob = 8
local count = (#ARGV - 5) / perJob
local top = cgPastIds(prefix .. "cg:lastid", KEYS[4], rcall("INCRBY", KEYS[4], count), count)
local marked, nextId = top, top - count
-- (whether a job went to wait: the marker wakes BullMQ's workers once)
local waiting = false
for i = 6, #ARGV, perJob do
  local deid, data, opts, token, lockMs = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local bot, own, jobTtl = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  nextId = nextId + 1
  local jobId = cgFreeId(prefix, KEYS[4], nextId)
  top = math.max(top, tonumber(jobId))
  local deKey = prefix .. "de:" .. deid
  local current = false
  -- A TTL of 0 is no deduplication (DEDUP_TTL_SECS=0): every event a new job.
  if ttl ~= "0" then
    if rcall("SET", deKey, jobId, "PX", jobTtl, "NX") then
      cgSetOwner(prefix, deid, jobId, bot, jobTtl)
    else
      current = rcall("GET", deKey)
      if not current then
        rcall("SET", deKey, jobId, "PX", jobTtl)
        cgSetOwner(prefix, deid, jobId, bot, jobTtl)
      elseif cgIsOther(prefix, deid, current, bot) then
        -- The key is another event's too (dedup.lua): this one's own record.
        local ownKey = prefix .. "de:" .. own
        current = rcall("GET", ownKey)
        if not current then
          rcall("SET", ownKey, jobId, "PX", jobTtl)
          cgKeepShared(prefix, deid, jobTtl)
        end
        deid = own
      end
    end
  end
  if current then
    rcall("XADD", eventsKey, "MAXLEN", "~", maxEvents, "*", "event", "deduplicated",
      "jobId", current, "deduplicationId", deid, "deduplicatedJobId", jobId)
    out[#out + 1] = {"d", current}
  else
    local jobKey = prefix .. jobId
    local locked = token ~= "" and lockRoom ~= 0
    if locked and lockRoom > 0 then
      lockRoom = lockRoom - 1
    end
    if locked then
      rcall("HMSET", jobKey, "name", name, "data", data, "opts", opts, "timestamp", ts,
        "delay", "0", "priority", "0", "deid", deid, "processedOn", ts, "pb", ARGV[5], "ats", "1")
    else
      rcall("HMSET", jobKey, "name", name, "data", data, "opts", opts, "timestamp", ts,
        "delay", "0", "priority", "0", "deid", deid)
    end
    rcall("XADD", eventsKey, "*", "event", "added", "jobId", jobId, "name", name)
    rcall("XADD", eventsKey, "MAXLEN", "~", maxEvents, "*", "event", "waiting", "jobId", jobId)
    if locked then
      rcall("LPUSH", KEYS[2], jobId)
      rcall("SET", jobKey .. ":lock", token, "PX", lockMs)
      rcall("XADD", eventsKey, "*", "event", "active", "jobId", jobId, "prev", "waiting")
      out[#out + 1] = {"l", jobId}
    else
      rcall("LPUSH", KEYS[1], jobId)
      if not waiting and not pausedOrMaxed then
        rcall("ZADD", KEYS[6], "0", "0")
      end
      waiting = true
      out[#out + 1] = {"a", jobId}
    end
  end
end
cgMarkIds(prefix .. "cg:lastid", top, marked)
return out
