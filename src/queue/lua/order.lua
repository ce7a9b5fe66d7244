--[[
  cogrelay: ordered delivery per key (`ordering = "session"`), shared by the
  scripts that add, finish and remove jobs (put in front of each one). Per
  destination queue and key, the list `<prefix>cg:ok:<key>` holds the ids of the
  key's jobs in the order they were accepted, from the first unfinished one (or
  the failed one that holds the key, `on_failure = "hold"`). Its head is where
  any job is (wait, active, delayed, failed); the others wait in BullMQ's
  `waiting-children` set, so BullMQ tools count them and no claim sees them. A
  job's hash names its key (`cg:ok`) and whether a failure holds it (`cg:oh`).
  `<prefix>cg:held` holds the keys whose head failed and holds them, scored by
  the time of the failure (a key retried or removed since is left there until
  the key moves on; readers check the head).
]]

-- The live head of `chain`: ids whose job is gone (removed by a BullMQ tool,
-- not by cogrelay, or its hash replaced by another type) are dropped from
-- the front.
local function cgHead(prefix, chain)
  while true do
    local head = redis.call("LINDEX", chain, 0)
    if not head or redis.call("TYPE", prefix .. head)["ok"] == "hash" then
      return head
    end
    redis.call("LPOP", chain)
  end
end

-- Lets the key's next job be claimed: out of waiting-children, to the end of
-- wait BullMQ takes from first (it was accepted before the jobs in wait).
local function cgPromote(prefix, chain)
  local head = cgHead(prefix, chain)
  if head and redis.call("ZREM", prefix .. "waiting-children", head) == 1 then
    redis.call("RPUSH", prefix .. "wait", head)
    redis.call("XADD", prefix .. "events", "*", "event", "waiting", "jobId", head,
      "prev", "waiting-children")
    if not redis.call("HGET", prefix .. "meta", "paused") then
      redis.call("ZADD", prefix .. "marker", 0, "0")
    end
  end
end

-- Job `jobId` of `key` leaves its key (delivered, failed under "continue",
-- removed): the key moves on if it was the head. Either way the key's first
-- live job is let go if it was parked (its head was deleted by a tool).
local function cgLeave(prefix, key, jobId)
  local chain = prefix .. "cg:ok:" .. key
  if cgHead(prefix, chain) == jobId then
    redis.call("LPOP", chain)
    redis.call("ZREM", prefix .. "cg:held", key)
  else
    -- A job behind the head (removed), or one outside its key's list (retried
    -- by an operator after it failed and let the key go on).
    redis.call("LREM", chain, 1, jobId)
  end
  cgPromote(prefix, chain)
end

-- Job `jobId` of `key` failed: under "hold" its key stays held from `ts`,
-- else the key moves on.
local function cgFailed(prefix, key, hold, jobId, ts)
  if hold == "1" and redis.call("LINDEX", prefix .. "cg:ok:" .. key, 0) == jobId then
    redis.call("ZADD", prefix .. "cg:held", ts, key)
  else
    cgLeave(prefix, key, jobId)
  end
end
