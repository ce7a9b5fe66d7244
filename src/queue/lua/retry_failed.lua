--[[
  cogrelay: moves the failed jobs it is given back to wait with their attempt
  counters reset, in one step per job: what a single retry does (BullMQ's
  reprocessJob with resetAttemptsMade/Started), for a batch, in the keys and
  with the events of BullMQ's moveJobsToWait. A job moved keeps when
  ("cg:due"): in wait it is aged from then, not from its creation.
    KEYS[1] failed, KEYS[2] wait, KEYS[3] meta, KEYS[4] active,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix, ARGV[2] timestamp (ms),
    ARGV[3] a bulk retry's start on Redis's clock (ms, from TIME), or ""
      (one job's retry),
    ARGV[4..] the jobs to move, each if it is in the failed set and, for a
      bulk retry, no retry moved it since that began ("cg:retried", written
      here on Redis's clock): a job moved meanwhile, by this retry or
      another, that failed again waits for the next retry, whatever the
      relays' clocks. An id given twice is moved once.
  An id whose hash is gone (a tool deleted it, or replaced it with another
  type) leaves the set, not moved.
  Returns {taken, moved}: the ids taken off the set and how many of them
  went back to wait.
]]
local rcall = redis.call
local broken = cgWrongType({ { KEYS[2], "list" }, { KEYS[5], "zset" }, { KEYS[6], "stream" } },
  "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to retry its failed jobs")
end
local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(ARGV[3])
local jobs, seen = {}, {}
for i = 4, #ARGV do
  local jobId = ARGV[i]
  if not seen[jobId] and rcall("ZSCORE", KEYS[1], jobId) then
    seen[jobId] = true
    local jobKey = ARGV[1] .. jobId
    local at = since and rcall("TYPE", jobKey)["ok"] == "hash" and
      tonumber(rcall("HGET", jobKey, "cg:retried"))
    if not (at and at >= since) then
      jobs[#jobs + 1] = jobId
    end
  end
end
if #jobs == 0 then
  return { 0, 0 }
end
local maxEvents = rcall("HGET", KEYS[3], "opts.maxLenEvents") or 10000
local meta = rcall("HMGET", KEYS[3], "paused", "concurrency")
local moved = {}
for _, jobId in ipairs(jobs) do
  local jobKey = ARGV[1] .. jobId
  if rcall("TYPE", jobKey)["ok"] == "hash" then
    rcall("HDEL", jobKey, "finishedOn", "processedOn", "failedReason")
    rcall("HSET", jobKey, "atm", 0, "ats", 0, "cg:due", ARGV[2], "cg:retried", now)
    rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "waiting",
      "jobId", jobId, "prev", "failed")
    moved[#moved + 1] = jobId
  end
end
rcall("ZREM", KEYS[1], unpack(jobs))
if #moved == 0 then
  return { #jobs, 0 }
end
rcall("LPUSH", KEYS[2], unpack(moved))
-- (a tool's concurrency that is not a number, or an active list of another
-- type, must not fail the script after its moves: Redis would keep them
-- and answer an error)
local limit = tonumber(meta[2])
local active = redis.pcall("LLEN", KEYS[4])
local maxed = limit and type(active) == "number" and active >= limit
if not meta[1] and not maxed then
  rcall("ZADD", KEYS[5], 0, "0")
end
return { #jobs, #moved }
