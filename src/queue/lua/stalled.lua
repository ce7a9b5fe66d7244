--[[
  cogrelay: puts back in wait the jobs whose relay died: a job in active
  whose lock expired (no lock key), as BullMQ's moveStalledJobsToWait does
  for a worker's stalled jobs (its lock is set in the same step as the job
  enters active, by BullMQ's scripts and ours, so one look suffices). The
  attempt is not counted (atm is unchanged); the stall is ("stc").
    KEYS[1] active, KEYS[2] wait, KEYS[3] stalled, KEYS[4] meta,
    KEYS[5] marker, KEYS[6] events
    ARGV[1] key prefix
  Returns how many jobs went back.
]]
local rcall = redis.call
local moved = {}
for _, jobId in ipairs(rcall("LRANGE", KEYS[1], 0, -1)) do
  local jobKey = ARGV[1] .. jobId
  if rcall("EXISTS", jobKey .. ":lock") == 0 then
    if rcall("LREM", KEYS[1], 1, jobId) > 0 then
      rcall("SREM", KEYS[3], jobId)
      if rcall("EXISTS", jobKey) == 1 then
        rcall("HINCRBY", jobKey, "stc", 1)
        rcall("RPUSH", KEYS[2], jobId)
        rcall("XADD", KEYS[6], "*", "event", "stalled", "jobId", jobId)
        rcall("XADD", KEYS[6], "*", "event", "waiting", "jobId", jobId, "prev", "active")
        moved[#moved + 1] = jobId
      end
    end
  end
end
if #moved > 0 and not rcall("HGET", KEYS[4], "paused") then
  rcall("ZADD", KEYS[5], 0, "0")
end
return #moved
