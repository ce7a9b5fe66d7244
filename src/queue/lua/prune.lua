--[[
  cogrelay: removes the oldest completed jobs beyond ARGV[2] (at most ARGV[3]
  per call): their hash and log, and their entry in the completed set. Dedup
  keys are left alone on purpose: they must outlive the job for DEDUP_TTL_SECS.
    KEYS[1] completed; ARGV[1] key prefix, ARGV[2] jobs to keep, ARGV[3] most per call
  Returns how many were removed.
]]
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess <= 0 then return 0 end
if excess > tonumber(ARGV[3]) then excess = tonumber(ARGV[3]) end
local ids = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
-- Deleted 250 jobs (500 keys) per call, not one call per job.
local keys = {}
for i, id in ipairs(ids) do
  keys[#keys + 1] = ARGV[1] .. id
  keys[#keys + 1] = ARGV[1] .. id .. ':logs'
  if #keys == 500 or i == #ids then
    redis.call('DEL', unpack(keys))
    keys = {}
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
return excess
