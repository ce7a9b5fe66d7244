--[[
  cogrelay: adds a batch of events, each as one job in each of its
  destinations' BullMQ queues, in one step: the ids come from the base queue's
  counter (unique over every queue), the dedup key is the base queue's and
  names every job (`destination=id,...`). Per job it does what add.lua does
  (BullMQ's addStandardJob), in that destination's queue.
    KEYS[1] the base queue's id counter
    ARGV[1] base key prefix (dedup keys), ARGV[2] timestamp (ms),
    ARGV[3] dedup TTL (ms), ARGV[4] job name, ARGV[5] worker name,
    then per event: dedup id (the event key), data (JSON object, without
    the destination), opts (JSON), lock token or "", lock duration (ms),
    the botId and own record of an event that may share its key (else ""
    and "": `dedup.lua`, put in front of this script), how long its dedup
    record lasts (ms: ARGV[3], or more for an envelope dated ahead of now),
    number of destinations n, then n times: queue
    key prefix, destination name, ordering key ("": unordered), "1" when a
    failure holds the key.
  A job of an ordered key goes behind the key's earlier jobs (`order.lua`, put
  in front of this script): it waits in waiting-children unless it is the
  key's first unfinished job, and only then may it be added locked.
  Returns per event {kind, text}: kind "a" with text `destination=id=l|w,...`
  (l: added locked, w: added waiting), "d" with the first event's text
  (`destination=id,...`, or a plain id from a one-queue relay), or "e" with
  why it was refused: one of its queues' meta holds a `concurrency` that is
  not a number, or a key it writes holds another type (`check.lua`, put in
  front of this script). Redis does not undo the writes of a script that
  fails midway, so an event is checked whole before its first write: a
  failure midway would have kept some of its jobs without its dedup record,
  and its resend would have added them again.
]]
local rcall = redis.call
local base, ts, ttl, name, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
-- The last id this call gave, and the mark its first INCRBY set
-- (`cgPastIds`, `cgMarkIds`).
local top, marked = nil, 0
-- Per queue: whether it may take jobs locked now (not paused, no global rate
-- limit, room under its global concurrency), read once per call; or the
-- text of why it takes none ("e").
local room = {}
local function lockRoom(prefix, dest)
  if room[prefix] == nil then
    local meta = rcall("HMGET", prefix .. "meta", "paused", "concurrency", "max", "cg:openUntil")
    local r = -1
    local limit, why = cgLimit(meta[2], "the queue of " .. dest)
    if why then
      room[prefix] = why .. " to take its events"
      return room[prefix]
    end
    local broken = cgBrokenKeys(prefix, "the queue of " .. dest)
    if broken then
      room[prefix] = broken
      return broken
    end
    if limit then
      r = math.max(limit - rcall("LLEN", prefix .. "active"), 0)
    end
    if meta[1] or meta[3] or meta[4] then
      r = 0
    end
    room[prefix] = { r = r, paused = meta[1] and true or false, fresh = true }
  end
  return room[prefix]
end

local i = 6
while i <= #ARGV do
  local deid, data, opts, token, lockMs, bot, own, eventTtl, n = ARGV[i], ARGV[i + 1],
    ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7],
    tonumber(ARGV[i + 8])
  local first = i + 9
  i = first + 4 * n
  local deKey = base .. "de:" .. deid
  local current, shared = false, false
  if ttl ~= "0" then
    current = rcall("GET", deKey)
    if current and cgIsOther(base, deid, current, bot) then
      -- The key is another event's too (dedup.lua): this one's own record.
      local ownKey = base .. "de:" .. own
      current = rcall("GET", ownKey)
      if not current then
        shared = deid
        deid, deKey, bot = own, ownKey, ""
      end
    end
  end
  -- Before the event's first write: every queue of it can take it.
  local refused = false
  if not current then
    for k = 0, n - 1 do
      local at = first + 4 * k
      local q = lockRoom(ARGV[at], ARGV[at + 1])
      if type(q) == "string" then
        refused = q
        break
      end
      if ARGV[at + 2] ~= "" then
        local chain = ARGV[at] .. "cg:ok:" .. ARGV[at + 2]
        local t = rcall("TYPE", chain)["ok"]
        if t ~= "none" and t ~= "list" then
          refused = "the queue of " .. ARGV[at + 1] .. "'s key " .. chain .. " is a " .. t ..
            ", not a list (another program on these names?): rename or delete it"
          break
        end
      end
    end
  end
  if current then
    out[#out + 1] = { "d", current }
  elseif refused then
    out[#out + 1] = { "e", refused }
  else
    local parts, named = {}, {}
    -- Its ids at once: a counter a tool broke fails before any write.
    local lastId = rcall("INCRBY", KEYS[1], n)
    if not top then
      lastId = cgPastIds(base .. "cg:lastid", KEYS[1], lastId, n)
      marked = lastId
    end
    top = lastId
    if shared then
      cgKeepShared(base, shared, eventTtl)
    end
    for k = 0, n - 1 do
      local at = first + 4 * k
      local prefix, dest, okey, hold = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
      local jobId = cgFreeId(prefix, KEYS[1], lastId - n + 1 + k)
      top = math.max(top, tonumber(jobId))
      local jobKey = prefix .. jobId
      local jobData = string.sub(data, 1, -2) .. ',"destination":"' .. dest .. '"}'
      local q = room[prefix]
      if q.fresh then
        q.fresh = false
        if not rcall("HGET", prefix .. "meta", "opts.maxLenEvents") then
          rcall("HSET", prefix .. "meta", "opts.maxLenEvents", 10000)
        end
      end
      -- Behind an earlier job of its key: parked until that one is done.
      local parked = false
      if okey ~= "" then
        local chain = prefix .. "cg:ok:" .. okey
        if rcall("RPUSH", chain, jobId) > 1 then
          -- Ids of jobs a BullMQ tool removed (or whose hash it replaced:
          -- as `cgHead`) are dropped from the front.
          local head = rcall("LINDEX", chain, 0)
          while head ~= jobId and rcall("TYPE", prefix .. head)["ok"] ~= "hash" do
            rcall("LPOP", chain)
            head = rcall("LINDEX", chain, 0)
          end
          parked = head ~= jobId
          if parked then
            -- The key's first live job, parked when it should not be (the
            -- one before it deleted by a tool): it goes.
            cgPromote(prefix, chain)
          end
        end
      end
      local locked = token ~= "" and q.r ~= 0 and not parked
      if locked and q.r > 0 then
        q.r = q.r - 1
      end
      local events = prefix .. "events"
      if locked then
        rcall("HMSET", jobKey, "name", name, "data", jobData, "opts", opts, "timestamp", ts,
          "delay", "0", "priority", "0", "deid", deid, "processedOn", ts, "pb", worker, "ats", "1")
      else
        rcall("HMSET", jobKey, "name", name, "data", jobData, "opts", opts, "timestamp", ts,
          "delay", "0", "priority", "0", "deid", deid)
      end
      if okey ~= "" then
        rcall("HSET", jobKey, "cg:ok", okey, "cg:oh", hold)
      end
      rcall("XADD", events, "*", "event", "added", "jobId", jobId, "name", name)
      if parked then
        rcall("ZADD", prefix .. "waiting-children", ts, jobId)
        rcall("XADD", events, "MAXLEN", "~", 10000, "*", "event", "waiting-children",
          "jobId", jobId)
      else
        rcall("XADD", events, "MAXLEN", "~", 10000, "*", "event", "waiting", "jobId", jobId)
      end
      if parked then
        parts[#parts + 1] = dest .. "=" .. jobId .. "=w"
      elseif locked then
        rcall("SET", jobKey .. ":lock", token, "PX", lockMs)
        rcall("LPUSH", prefix .. "active", jobId)
        rcall("XADD", events, "*", "event", "active", "jobId", jobId, "prev", "waiting")
        parts[#parts + 1] = dest .. "=" .. jobId .. "=l"
      else
        rcall("LPUSH", prefix .. "wait", jobId)
        if not q.paused then
          rcall("ZADD", prefix .. "marker", "0", "0")
        end
        parts[#parts + 1] = dest .. "=" .. jobId .. "=w"
      end
      named[#named + 1] = dest .. "=" .. jobId
    end
    if ttl ~= "0" then
      local value = table.concat(named, ",")
      rcall("SET", deKey, value, "PX", eventTtl)
      cgSetOwner(base, deid, value, bot, eventTtl)
    end
    out[#out + 1] = { "a", table.concat(parts, ",") }
  end
end
cgMarkIds(base .. "cg:lastid", top, marked)
return out
