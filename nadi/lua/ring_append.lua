-- The ring append (nadi.ring.RingWriter.append). KEYS[1]: the live stream.
-- ARGV: 1 msgpack items [day, token, seq, mode, offset, length, expect], 2 maxlen,
-- 3 live_maxlen, 4 ttl, 5 the joined live payload, 6..10 key prefixes, 11 BITMAP_MAX_SEQ.
local items = cmsgpack.unpack(ARGV[1])
local maxlen, live_maxlen, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local blob, bigseq = ARGV[5], tonumber(ARGV[11])
-- Key prefixes (nadi.redis_keys.RedisKeys.script_prefixes): all keys share one hash slot.
local ringp, topp, floorp, appp, big = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local call, sub = redis.call, string.sub
-- Per (day, token): {day, token, floor, top, bitmap key, dirty}; per token: the ring key.
local out, groups, ringkeys, restarted = {}, {}, {}, {}
local appended = 0
for i, it in ipairs(items) do
  local day, token, seq, mode, expect = it[1], it[2], it[3], it[4], it[7]
  local gk = day * 4294967296 + token
  local g = groups[gk]
  if g == nil then
    local f = call('HGET', floorp .. day, token)
    local top = call('HGET', topp .. day, token)
    g = {day, token, tonumber(f or '-1'), tonumber(top or '-1'),
         appp .. day .. ':' .. token, false}
    groups[gk] = g
    if expect >= 0 and g[4] < expect then
      -- Behind what this worker already appended: Redis lost data. Restart after it.
      call('DEL', ringp .. token, g[5], g[5] .. big)
      g[3], g[4], g[6] = expect + 1, expect, true
      restarted[#restarted + 1] = token
      restarted[#restarted + 1] = day
      restarted[#restarted + 1] = (top and 2 or 3)
    end
  end
  if g[3] < 0 and mode == 1 then
    -- No ring for this instrument-day (a new day, or Redis lost it): it starts here.
    g[3] = seq
    g[6] = true
  end
  local fresh = false
  if mode ~= 2 or (g[3] >= 0 and seq >= g[3]) then
    if seq < bigseq then
      fresh = call('SETBIT', g[5], seq, 1) == 0
    else
      fresh = call('SADD', g[5] .. big, seq) == 1
    end
  end
  if fresh then
    local rk = ringkeys[token]
    if rk == nil then
      rk = ringp .. token
      ringkeys[token] = rk
    end
    -- The tick's JSON is a slice of the live payload (ARGV[5]): sent once, not twice.
    out[i] = call('XADD', rk, 'MAXLEN', '~', maxlen, '*', 'd', sub(blob, it[5], it[5] + it[6] - 1))
    appended = appended + 1
    if seq > g[4] then g[4] = seq end
    g[6] = true
  else
    out[i] = ''
  end
end
for _, g in pairs(groups) do
  if g[6] then
    local fk, tk = floorp .. g[1], topp .. g[1]
    call('HSET', fk, g[2], g[3])
    call('HSET', tk, g[2], g[4])
    call('EXPIRE', fk, ttl)
    call('EXPIRE', tk, ttl)
    call('EXPIRE', g[5], ttl)
    if call('EXISTS', g[5] .. big) == 1 then call('EXPIRE', g[5] .. big, ttl) end
  end
end
for _, rk in pairs(ringkeys) do call('EXPIRE', rk, ttl) end
-- Building the live JSON in Lua cost more than all the XADDs: the client sends the batch's
-- payloads pre-joined (ARGV[5]) and only the offsets are joined here (and returned so,
-- one string rather than an array of thousands).
local offsets = table.concat(out, ',')
if appended > 0 then
  call('XADD', KEYS[1], 'MAXLEN', '~', live_maxlen, '*', 'p', blob, 'o', offsets)
  call('EXPIRE', KEYS[1], ttl)
end
return {offsets, restarted}
