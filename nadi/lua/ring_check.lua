-- The ring check (nadi.ring.RingWriter.check). ARGV: 1 msgpack [[day, token, db_last
-- (-1: none)], ...], 2..6 key prefixes, 7 ttl. Returns a flat list of token, day, outcome
-- (0 consistent, 1 ahead of the database, 2 behind: restarted, 3 no ring state although the
-- database has ticks: restarted).
local items = cmsgpack.unpack(ARGV[1])
-- Key prefixes (nadi.redis_keys.RedisKeys.script_prefixes): all keys share one hash slot.
local ringp, topp, floorp, appp, big = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ttl = tonumber(ARGV[7])
local call = redis.call
local out = {}
for _, it in ipairs(items) do
  local day, token, last = it[1], it[2], it[3]
  local top = call('HGET', topp .. day, token)
  local outcome = 0
  if top then top = tonumber(top) end
  if last >= 0 then
    if not top then outcome = 3 elseif top < last then outcome = 2 elseif top > last then outcome = 1 end
  elseif top then
    outcome = 1
  end
  if outcome >= 2 then
    local ak = appp .. day .. ':' .. token
    call('DEL', ringp .. token, ak, ak .. big)
    call('HSET', topp .. day, token, last)
    call('HSET', floorp .. day, token, last + 1)
    call('EXPIRE', topp .. day, ttl)
    call('EXPIRE', floorp .. day, ttl)
  end
  if outcome > 0 then
    out[#out + 1] = token
    out[#out + 1] = day
    out[#out + 1] = outcome
  end
end
return out
