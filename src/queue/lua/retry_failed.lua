--[[
  cogrelay: moves up to ARGV[2] failed jobs back to wait with their attempt
  counters reset, in one step per job: what a single retry does (BullMQ's
  reprocessJob with resetAttemptsMade/Started), for a batch, in the keys and
  with the events of BullMQ's moveJobsToWait.
    KEYS[1] failed, KEYS[2] wait, KEYS[3] meta, KEYS[4] active,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix, ARGV[2] batch size
  Returns how many jobs were moved (fewer than the batch size: none left).
]]
local rcall = redis.call
local jobs = rcall("ZRANGE", KEYS[1], 0, tonumber(ARGV[2]) - 1)
if #jobs == 0 then
  return 0
end
local maxEvents = rcall("HGET", KEYS[3], "opts.maxLenEvents") or 10000
for _, jobId in ipairs(jobs) do
  local jobKey = ARGV[1] .. jobId
  rcall("HDEL", jobKey, "finishedOn", "processedOn", "failedReason")
  rcall("HSET", jobKey, "atm", 0, "ats", 0)
  rcall("XADD", KEYS[6], "MAXLEN", "~", maxEvents, "*", "event", "waiting",
    "jobId", jobId, "prev", "failed")
end
rcall("ZREM", KEYS[1], unpack(jobs))
rcall("LPUSH", KEYS[2], unpack(jobs))
local meta = rcall("HMGET", KEYS[3], "paused", "concurrency")
local maxed = meta[2] and rcall("LLEN", KEYS[4]) >= tonumber(meta[2])
if not meta[1] and not maxed then
  rcall("ZADD", KEYS[5], 0, "0")
end
return #jobs
