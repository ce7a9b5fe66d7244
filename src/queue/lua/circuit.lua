--[[
  cogrelay: the circuit shared by every relay of a destination (claim.lua
  reads it), opened or closed on Redis's own clock (TIME), so that relays'
  clocks do not matter.
    KEYS[1] the destination queue's meta
    ARGV[1] "open" or "close", ARGV[2] the cool-down (ms) when opening
  Opening: nothing is claimed until now + the cool-down, then one claim
  takes a round of trials (cg:probeUntil keeps the others off while they
  run). Returns the cool-down (ms), or 0 when closing.
]]
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == "open" then
  local cooldown = tonumber(ARGV[2])
  local untilMs = now + cooldown
  redis.call("HSET", KEYS[1], "cg:openUntil", untilMs, "cg:probeUntil", untilMs,
    "cg:cooldown", cooldown)
  return cooldown
end
redis.call("HDEL", KEYS[1], "cg:openUntil", "cg:probeUntil", "cg:cooldown")
return 0
