--[[
  cogrelay: puts jobs this caller holds back to wait without counting an
  attempt (BullMQ's moveJobFromActiveToWait), only where the token is still the
  caller's.
    KEYS[1] active, KEYS[2] wait, KEYS[3] stalled, KEYS[4] prioritized,
    KEYS[5] meta, KEYS[6] marker, KEYS[7] events
    ARGV[1] key prefix, then 2 per job: id, token
  Returns how many jobs went back.
]]
local rcall = redis.call
local broken = cgWrongType({ { KEYS[2], "list" }, { KEYS[4], "zset" }, { KEYS[7], "stream" },
  { KEYS[6], "zset" } }, "the queue")
if broken then
  return redis.error_reply("ERR " .. broken .. " to put back the jobs it was given")
end
local moved = 0
for i = 2, #ARGV, 2 do
  local jobId, token = ARGV[i], ARGV[i + 1]
  local jobKey = ARGV[1] .. jobId
  if rcall("EXISTS", jobKey) == 1 and rcall("GET", jobKey .. ":lock") == token then
    rcall("DEL", jobKey .. ":lock")
    -- (BullMQ's stalled set, which cogrelay does not read: one a tool made
    -- another type is left alone; so is a job's hash of another type)
    redis.pcall("SREM", KEYS[3], jobId)
    if rcall("LREM", KEYS[1], 1, jobId) > 0 then
      local priority = tonumber(redis.pcall("HGET", jobKey, "priority")) or 0
      if priority > 0 then
        rcall("ZADD", KEYS[4], priority * 0x100000000, jobId)
      else
        rcall("RPUSH", KEYS[2], jobId)
      end
      rcall("XADD", KEYS[7], "*", "event", "waiting", "jobId", jobId, "prev", "active")
      moved = moved + 1
    end
  end
end
if moved > 0 and not rcall("HGET", KEYS[5], "paused") then
  rcall("ZADD", KEYS[6], 0, "0")
end
return moved
