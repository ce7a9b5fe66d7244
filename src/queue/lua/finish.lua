--[[
  cogrelay: finishes a batch of attempts in BullMQ's layout. Per job, only while
  the caller's lock token is still the job's: release the lock, append the
  attempt to the job's log, count the attempt in "atm", and then what BullMQ's
  moveToFinished (completed, failed) or moveToDelayed (a retry) does.
    KEYS[1] wait, KEYS[2] active, KEYS[3] prioritized, KEYS[4] events,
    KEYS[5] stalled, KEYS[6] delayed, KEYS[7] meta, KEYS[8] completed,
    KEYS[9] failed, KEYS[10] marker
    ARGV[1] key prefix, ARGV[2] timestamp (ms), ARGV[3] log lines kept,
    then 7 per job: id, token, outcome ("completed", "failed" or "delayed"),
    log line, reason, due time (ms, for "delayed"), attempts made with this
    one ("atm" as the caller read it under the same lock, plus one: only a
    lock holder changes it)
  Numbers go to Redis as the caller's strings where they can: a Lua number
  becomes a string through printf, which costs more than the command.
  A job of an ordered key (`order.lua`, put in front of this script) that is
  delivered, or failed without holding its key, lets the key's next job go.
  Returns per job 1 (done) or 0 (the lock is not the caller's any more).
]]
local rcall = redis.call
local prefix, ts, keepLogs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local tsText = ARGV[2]
local eventsKey = KEYS[4]
local maxEvents = rcall("HGET", KEYS[7], "opts.maxLenEvents") or 10000
rcall("XTRIM", eventsKey, "MAXLEN", "~", maxEvents)
local out = {}
local delayed = false
-- Gathered per batch and sent once at the end: released locks, ids leaving the
-- stalled set, and the completed / failed sets' new members.
local locks, done_ids, completed, failed = {}, {}, {}, {}
-- Every job's lock, read in one call.
local lockKeys = {}
for i = 4, #ARGV, 7 do
  lockKeys[#lockKeys + 1] = prefix .. ARGV[i] .. ":lock"
end
local held = rcall("MGET", unpack(lockKeys))
for i = 4, #ARGV, 7 do
  local jobId, token, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local line, reason = ARGV[i + 3], ARGV[i + 4]
  local jobKey = prefix .. jobId
  local lockKey = lockKeys[(i - 4) / 7 + 1]
  local done = 0
  if held[(i - 4) / 7 + 1] == token then
    locks[#locks + 1] = lockKey
    done_ids[#done_ids + 1] = jobId
    if rcall("LREM", KEYS[2], -1, jobId) > 0 then
      done = 1
      local logKey = jobKey .. ":logs"
      local atm = ARGV[i + 6]
      if rcall("RPUSH", logKey, line) > keepLogs and keepLogs > 0 then
        rcall("LTRIM", logKey, -keepLogs, -1)
      end
      if outcome == "completed" then
        completed[#completed + 1] = tsText
        completed[#completed + 1] = jobId
        rcall("HSET", jobKey, "atm", atm, "returnvalue", '"delivered"', "finishedOn", tsText)
        rcall("XADD", eventsKey, "*", "event", "completed", "jobId", jobId,
          "returnvalue", '"delivered"', "prev", "active")
        local key = rcall("HGET", jobKey, "cg:ok")
        if key then
          cgLeave(prefix, key, jobId)
        end
      elseif outcome == "failed" then
        failed[#failed + 1] = tsText
        failed[#failed + 1] = jobId
        rcall("HSET", jobKey, "atm", atm, "failedReason", reason, "finishedOn", tsText)
        rcall("HDEL", jobKey, "defa")
        rcall("XADD", eventsKey, "*", "event", "failed", "jobId", jobId,
          "failedReason", reason, "prev", "active")
        rcall("XADD", eventsKey, "*", "event", "retries-exhausted", "jobId", jobId,
          "attemptsMade", atm)
        local key = rcall("HMGET", jobKey, "cg:ok", "cg:oh")
        if key[1] then
          cgFailed(prefix, key[1], key[2], jobId, tsText)
        end
      else
        local dueAt = math.max(tonumber(ARGV[i + 5]), ts)
        local minScore = dueAt * 0x1000
        local maxScore = (dueAt + 1) * 0x1000 - 1
        local last = rcall("ZREVRANGEBYSCORE", KEYS[6], maxScore, minScore, "WITHSCORES",
          "LIMIT", 0, 1)
        local score = minScore
        if last[2] then
          score = math.min(tonumber(last[2]) + 1, maxScore)
        end
        rcall("HSET", jobKey, "atm", atm, "delay", dueAt - ts, "failedReason", reason)
        rcall("ZADD", KEYS[6], score, jobId)
        rcall("XADD", eventsKey, "MAXLEN", "~", maxEvents, "*", "event", "delayed",
          "jobId", jobId, "delay", dueAt)
        delayed = true
      end
    end
  end
  out[#out + 1] = done
end
if #locks > 0 then
  rcall("DEL", unpack(locks))
  rcall("SREM", KEYS[5], unpack(done_ids))
end
if #completed > 0 then
  rcall("ZADD", KEYS[8], unpack(completed))
end
if #failed > 0 then
  rcall("ZADD", KEYS[9], unpack(failed))
end
if delayed then
  local first = rcall("ZRANGE", KEYS[6], 0, 0, "WITHSCORES")
  if first[2] then
    rcall("ZADD", KEYS[10], math.floor(tonumber(first[2]) / 0x1000), "1")
  end
end
if rcall("LLEN", KEYS[1]) == 0 and rcall("LLEN", KEYS[2]) == 0 and rcall("ZCARD", KEYS[3]) == 0 then
  rcall("XADD", eventsKey, "*", "event", "drained")
end
return out
