--[[
  cogrelay: moves the failed jobs it is given back to wait with their attempt
  counters reset, in one step per job: what a single retry does (BullMQ's
  reprocessJob with resetAttemptsMade/Started), for a batch, in the keys and
  with the events of BullMQ's moveJobsToWait. A job moved keeps when
  ("cg:due"): in wait it is aged from then, not from its creation.
    KEYS[1] failed, KEYS[2] wait, KEYS[3] meta, KEYS[4] active,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix, ARGV[2] timestamp (ms),
    ARGV[3..] pairs: a job to move, and its score in the failed set when
      the retry read it ("" for any score). A bulk retry gives the jobs the
      set had when it began: one moved meanwhile (by this retry or another)
      that failed again has another score, and waits for the next retry.
      An id given twice is moved once.
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
local jobs, seen = {}, {}
for i = 3, #ARGV - 1, 2 do
  local jobId, read = ARGV[i], ARGV[i + 1]
  if not seen[jobId] then
    seen[jobId] = true
    local score = rcall("ZSCORE", KEYS[1], jobId)
    if score and (read == "" or score == read) then
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
    rcall("HSET", jobKey, "atm", 0, "ats", 0, "cg:due", ARGV[2])
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
