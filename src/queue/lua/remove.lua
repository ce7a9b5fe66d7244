--[[
  cogrelay: removes a job that is not being delivered: what BullMQ's removeJob
  does for a job without parent or children (out of every state, its hash and
  log deleted, its dedup key too when it names this job alone, a "removed"
  event), and, in the same step, a job of an ordered key leaves its key (see
  `order.lua`, put in front of this script): the key's next job may go.
    ARGV[1] key prefix, ARGV[2] job id
  Returns 1 (removed), 0 (locked: being delivered) or -1 (no such job).
]]
local rcall = redis.call
local prefix, jobId = ARGV[1], ARGV[2]
local jobKey = prefix .. jobId
if rcall("EXISTS", jobKey) == 0 then
  return -1
end
if rcall("EXISTS", jobKey .. ":lock") == 1 then
  return 0
end
-- Where an ordered key's next job goes once this one leaves (`check.lua`).
local broken = cgWrongType({ { prefix .. "wait", "list" } }, "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to remove a job")
end
local f = rcall("HMGET", jobKey, "deid", "cg:ok")
if f[2] then
  cgLeave(prefix, f[2], jobId)
end
local prev = "unknown"
for _, set in ipairs({ "completed", "waiting-children", "delayed", "failed", "prioritized" }) do
  if rcall("ZREM", prefix .. set, jobId) == 1 then
    prev = set
    break
  end
end
if prev == "unknown" then
  for _, list in ipairs({ "wait", "paused", "active" }) do
    if rcall("LREM", prefix .. list, 1, jobId) == 1 then
      prev = list
      break
    end
  end
end
-- A record another event shares (dedup.lua) stays: its resends find it.
if f[1] and rcall("GET", prefix .. "de:" .. f[1]) == jobId
  and rcall("EXISTS", prefix .. "cg:des:" .. f[1]) == 0 then
  rcall("DEL", prefix .. "de:" .. f[1], prefix .. "cg:deb:" .. f[1])
end
rcall("DEL", jobKey, jobKey .. ":logs")
local maxEvents = rcall("HGET", prefix .. "meta", "opts.maxLenEvents") or 10000
rcall("XADD", prefix .. "events", "MAXLEN", "~", maxEvents, "*", "event", "removed",
  "jobId", jobId, "prev", prev)
return 1
