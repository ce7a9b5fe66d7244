--[[
  cogrelay: the dedup record of an envelope that may share its key with
  another event (`Event::key_sharer`); put in front of add.lua and
  add_routed.lua. Beside the key's `de:` record, `cg:deb:<key>` holds that
  record's value and its event's botId when that holds a `-`
  ("<value>\n<botId>"): one whose value is not the record's (the record was
  replaced since) names nobody. An event
  that finds another botId there is another event: it is deduplicated under
  its own record, and the key's record and botId then last as long, marked
  shared (`cg:des:<key>`), which remove.lua keeps (the other event's resends
  still find it).
]]

-- Whether the key's record `deid` (of value `current`) is another event's
-- than the one of `bot` ("" for an event that cannot share its key): its
-- botId, when kept, is another; when none is kept (the event's botId has no
-- `-`: `KeySharer::is_other`), exactly when `bot` holds one.
local function cgIsOther(dePrefix, deid, current, bot)
  if bot == "" then
    return false
  end
  local d = redis.call("GET", dePrefix .. "cg:deb:" .. deid)
  if d and string.sub(d, 1, #current + 1) == current .. "\n" then
    return string.sub(d, #current + 2) ~= bot
  end
  return string.find(bot, "-", 1, true) ~= nil
end

-- Beside the record `deid` now of `value`: a botId that holds a `-`.
local function cgSetOwner(dePrefix, deid, value, bot, ttl)
  if string.find(bot, "-", 1, true) then
    redis.call("SET", dePrefix .. "cg:deb:" .. deid, value .. "\n" .. bot, "PX", ttl)
  end
end

-- The shared key's record and botId last at least `ttl` more, marked shared.
local function cgKeepShared(dePrefix, deid, ttl)
  local n = tonumber(ttl)
  for _, k in ipairs({ dePrefix .. "de:" .. deid, dePrefix .. "cg:deb:" .. deid }) do
    local left = redis.call("PTTL", k)
    if left >= 0 and left < n then
      redis.call("PEXPIRE", k, n)
    end
  end
  -- Never shortened either: the TTLs differ by event (an envelope dated
  -- ahead keeps its records longer), and a marker cut back by a later
  -- sharer let a remove drop the key's record while the dated one's
  -- replay was still admitted.
  local marker = dePrefix .. "cg:des:" .. deid
  if redis.call("PTTL", marker) < n then
    redis.call("SET", marker, "1", "PX", n)
  end
end

