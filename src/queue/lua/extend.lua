--[[
  cogrelay: extends the locks of a batch of jobs, only where the token is still
  the caller's (BullMQ's extendLocks).
    KEYS[1] stalled
    ARGV[1] key prefix, ARGV[2] lock duration (ms), then 2 per job: id, token
  Returns the ids whose lock is not the caller's any more.
]]
local rcall = redis.call
local lost = {}
for i = 3, #ARGV, 2 do
  local lockKey = ARGV[1] .. ARGV[i] .. ":lock"
  if rcall("GET", lockKey) == ARGV[i + 1] then
    rcall("SET", lockKey, ARGV[i + 1], "PX", ARGV[2])
    rcall("SREM", KEYS[1], ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
