-- Shared by the lock scripts (prepended by the loader).
-- ARGV[1] = key prefix, ARGV[2] = tenant, ARGV[3] = resource.
-- A lock is the HASH <prefix>lock:<tenant>:<resource>:
--   mode        exclusive | shared
--   fence       the fencing token of the current exclusive hold (0 for a shared lock)
--   updated_ms  last change
--   o:<owner>   "<hold count>|<expires ms>", one field per owner (each owner expires alone)
-- The key itself expires with its last owner (PEXPIREAT = the latest owner expiry).
-- Indexes: <prefix>locks:lex (ZSET, score 0, member "<tenant>:<resource>", for listing by
-- prefix) and <prefix>locks:exp (same members, score = lock expiry, to drop expired members
-- from both). Fencing tokens come from one counter, <prefix>locks:fence, that only grows, so
-- a resource's token never goes back, also after a release or an expiry.
local P = ARGV[1]
local member = ARGV[2] .. ':' .. ARGV[3]
local key = P .. 'lock:' .. member
local LEX, EXP = P .. 'locks:lex', P .. 'locks:exp'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function unindex(m)
  redis.call('ZREM', LEX, m)
  redis.call('ZREM', EXP, m)
end

-- Drop index members whose lock has expired (bounded work per call).
local function gc()
  local old = redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, 100)
  for _, m in ipairs(old) do
    local left = redis.call('PTTL', P .. 'lock:' .. m)
    if left > 0 then redis.call('ZADD', EXP, now + left, m) else unindex(m) end
  end
end

-- The lock with its live owners ({owner = {count, expires_ms}}), or nil when nobody holds it.
-- Expired owners are removed from the hash on the way.
local function load()
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then return nil end
  local lock = {owners = {}, n = 0, mode = 'exclusive', fence = 0}
  for i = 1, #raw, 2 do
    local f, v = raw[i], raw[i + 1]
    if string.sub(f, 1, 2) == 'o:' then
      local sep = string.find(v, '|', 1, true)
      local count, exp = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
      if exp > now then
        lock.owners[string.sub(f, 3)] = {count, exp}
        lock.n = lock.n + 1
      else
        redis.call('HDEL', key, f)
      end
    elseif f == 'mode' then
      lock.mode = v
    elseif f == 'fence' then
      lock.fence = tonumber(v)
    end
  end
  if lock.n == 0 then
    redis.call('DEL', key)
    unindex(member)
    return nil
  end
  return lock
end

local function save(lock)
  local latest = 0
  for owner, o in pairs(lock.owners) do
    redis.call('HSET', key, 'o:' .. owner, o[1] .. '|' .. o[2])
    if o[2] > latest then latest = o[2] end
  end
  redis.call('HSET', key, 'mode', lock.mode, 'fence', lock.fence, 'updated_ms', now)
  redis.call('PEXPIREAT', key, latest)
  redis.call('ZADD', LEX, 0, member)
  redis.call('ZADD', EXP, latest, member)
end

-- {status, mode, fence, updated_ms, now_ms, owner, count, expires_ms, ...}
local function reply(status, lock)
  local out = {status, lock.mode, lock.fence, now, now}
  if lock.updated then out[4] = lock.updated end
  for owner, o in pairs(lock.owners) do
    out[#out + 1] = owner
    out[#out + 1] = o[1]
    out[#out + 1] = o[2]
  end
  return out
end
