--[[
  cogrelay: moves up to ARGV[2] failed jobs back to wait with their attempt
  counters reset, in one step per job: what a single retry does (BullMQ's
  reprocessJob with resetAttemptsMade/Started), for a batch, in the keys and
  with the events of BullMQ's moveJobsToWait. A job moved keeps when
  ("cg:due"): in wait it is aged from then, not from its creation.
    KEYS[1] failed, KEYS[2] wait, KEYS[3] meta, KEYS[4] active,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix, ARGV[2] batch size, ARGV[3] timestamp (ms),
    ARGV[4] (optional) the one job to move, if it is failed; "" for a batch
    ARGV[5] (a batch, optional) the highest score to take: the failed set's
      highest when the retry began, so that a job one of its batches moved
      and that failed again since (scored later) is not moved twice
  An id whose hash is gone (a tool deleted it, or replaced it with another
  type) leaves the set, not moved.
  Returns {taken, moved}: the ids taken off the set (fewer than the batch
  size: none left) and how many of them went back to wait.
]]
local rcall = redis.call
local broken = cgWrongType({ { KEYS[2], "list" }, { KEYS[5], "zset" }, { KEYS[6], "stream" } },
  "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to retry its failed jobs")
end
local jobs
if ARGV[4] and ARGV[4] ~= "" then
  jobs = rcall("ZSCORE", KEYS[1], ARGV[4]) and { ARGV[4] } or {}
elseif ARGV[5] then
  jobs = rcall("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[5], "LIMIT", 0, tonumber(ARGV[2]))
else
  jobs = rcall("ZRANGE", KEYS[1], 0, tonumber(ARGV[2]) - 1)
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
    rcall("HSET", jobKey, "atm", 0, "ats", 0, "cg:due", ARGV[3])
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
