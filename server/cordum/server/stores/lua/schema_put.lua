-- Register or replace one schema, keeping the index bounded.
-- KEYS[1] schema:<id>  KEYS[2] schemas:index (ZSET, lex)  KEYS[3] schemas:meta (HASH)
-- ARGV[1] id  ARGV[2] schema JSON  ARGV[3] now (ms)  ARGV[4] sha256  ARGV[5] max schemas
-- Returns {status, created_ms}: status 1 = created, 2 = replaced, 0 = registry full.
local id, now = ARGV[1], ARGV[3]
local old = redis.call('HGET', KEYS[3], id)
local created = now
local status = 1
if old then
  created = string.match(old, '^(%d+)|') or now
  status = 2
elseif redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return {0, 0}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, id)
redis.call('HSET', KEYS[3], id, created .. '|' .. now .. '|' .. ARGV[4])
return {status, tonumber(created)}
