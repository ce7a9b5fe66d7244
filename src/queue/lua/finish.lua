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
  In two passes, as Redis keeps a failed script's writes: every job leaves
  active and reaches its set (completed, failed, delayed) before any job's
  hash, log, events or ordered key are written, each job's apart (a key a
  tool made another type stops that job's, not the others'), so no job
  taken out of active is left in no list. A job to be failed or retried
  whose set is of another type (`check.lua`) is not touched: its lock
  stays, and it is answered why. A delivered one is finished all the same
  (not delivered again), outside a `completed` set of another type.
  Returns {done, late}: per job 1 (done), 0 (the lock is not the caller's
  any more) or why it is refused (nothing of it written); late says what
  could not be written of jobs that are done, else false.
]]
local rcall = redis.call
-- Where an ordered key's next job goes (wait), before any job moves.
local broken = cgWrongType({ { KEYS[1], "list" } }, "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to record its deliveries")
end
local prefix, ts, keepLogs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local tsText = ARGV[2]
local eventsKey = KEYS[4]
local maxEvents = rcall("HGET", KEYS[7], "opts.maxLenEvents") or 10000
rcall("XTRIM", eventsKey, "MAXLEN", "~", maxEvents)
-- Why jobs of an outcome are refused (its set of another type), looked at
-- once per set and only for the outcomes the batch has.
local setOf = { completed = KEYS[8], failed = KEYS[9], delayed = KEYS[6] }
local refusals = {}
local function refusal(outcome)
  local set = setOf[outcome] or KEYS[6]
  if refusals[set] == nil then
    local w = cgWrongType({ { set, "zset" } }, "the queue")
    refusals[set] = w and (w .. " to record its results") or false
  end
  return refusals[set]
end
local out, late = {}, false
local delayed = false
-- Gathered per batch and sent once: released locks, ids leaving the
-- stalled set, the completed / failed sets' new members, and the jobs that
-- moved (their ARGV index) for the second pass.
local locks, done_ids, completed, failed, moved = {}, {}, {}, {}, {}
-- Every job's lock, read in one call.
local lockKeys = {}
for i = 4, #ARGV, 7 do
  lockKeys[#lockKeys + 1] = prefix .. ARGV[i] .. ":lock"
end
local held = rcall("MGET", unpack(lockKeys))
-- First pass: out of active, into its set.
for i = 4, #ARGV, 7 do
  local k = (i - 4) / 7 + 1
  local jobId, token, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local done = 0
  if held[k] == token then
    local refused = outcome ~= "completed" and refusal(outcome)
    if refused then
      done = refused
    else
      locks[#locks + 1] = lockKeys[k]
      done_ids[#done_ids + 1] = jobId
      if rcall("LREM", KEYS[2], -1, jobId) > 0 then
        done = 1
        moved[#moved + 1] = i
        if outcome == "completed" then
          completed[#completed + 1] = tsText
          completed[#completed + 1] = jobId
        elseif outcome == "failed" then
          failed[#failed + 1] = tsText
          failed[#failed + 1] = jobId
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
          rcall("ZADD", KEYS[6], score, jobId)
          delayed = true
        end
      end
    end
  end
  out[k] = done
end
-- (a completed set a tool made another type cannot list the delivered
-- jobs: they are finished all the same, said in `late`)
if #completed > 0 and type(redis.pcall("ZADD", KEYS[8], unpack(completed))) == "table" then
  late = (refusal("completed") or "the completed set could not be written") .. " (" ..
    (#completed / 2) .. " delivered, not listed there)"
end
if #failed > 0 then
  rcall("ZADD", KEYS[9], unpack(failed))
end
if #locks > 0 then
  rcall("DEL", unpack(locks))
  -- (BullMQ's stalled set, which cogrelay does not read: one a tool made
  -- another type is left alone)
  redis.pcall("SREM", KEYS[5], unpack(done_ids))
end
-- Second pass: each moved job's log, hash, events and ordered key, each
-- job's apart (Lua's pcall: a key of another type stops that job's writes,
-- said in `late`).
local function record(i)
  local jobId, outcome, line, reason = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local jobKey = prefix .. jobId
  local logKey = jobKey .. ":logs"
  local atm = ARGV[i + 6]
  -- (a log a tool made another type is not written to)
  local logged = redis.pcall("RPUSH", logKey, line)
  if type(logged) == "number" and logged > keepLogs and keepLogs > 0 then
    rcall("LTRIM", logKey, -keepLogs, -1)
  end
  if outcome == "completed" then
    rcall("HSET", jobKey, "atm", atm, "returnvalue", '"delivered"', "finishedOn", tsText)
    rcall("XADD", eventsKey, "*", "event", "completed", "jobId", jobId,
      "returnvalue", '"delivered"', "prev", "active")
    local key = rcall("HGET", jobKey, "cg:ok")
    if key then
      cgLeave(prefix, key, jobId)
    end
  elseif outcome == "failed" then
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
    rcall("HSET", jobKey, "atm", atm, "delay", dueAt - ts, "failedReason", reason)
    rcall("XADD", eventsKey, "MAXLEN", "~", maxEvents, "*", "event", "delayed",
      "jobId", jobId, "delay", dueAt)
  end
end
for _, i in ipairs(moved) do
  local ok, err = pcall(record, i)
  if not ok then
    local e = type(err) == "table" and err.err or tostring(err)
    late = (late and late .. "; " or "") .. "job " .. ARGV[i] .. " finished, but: " .. e
  end
end
if delayed then
  local first = rcall("ZRANGE", KEYS[6], 0, 0, "WITHSCORES")
  if first[2] then
    redis.pcall("ZADD", KEYS[10], math.floor(tonumber(first[2]) / 0x1000), "1")
  end
end
-- (counts a tool's key of another type cannot give are not zero)
local function size(command, key)
  local n = redis.pcall(command, key)
  return type(n) == "number" and n or 1
end
if size("LLEN", KEYS[1]) == 0 and size("LLEN", KEYS[2]) == 0 and size("ZCARD", KEYS[3]) == 0 then
  rcall("XADD", eventsKey, "*", "event", "drained")
end
return { out, late }
