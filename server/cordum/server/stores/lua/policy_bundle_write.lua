-- Create, update or delete one draft policy bundle (compare-and-set on its stored bytes)
-- and append the audit entry of the change, atomically.
-- KEYS[1] policy:bundle:<id>  KEYS[2] policy:bundles (ZSET, lex)
-- KEYS[3] policy:audit (ZSET seq → entry)  KEYS[4] policy:audit:seq
-- ARGV[1] id  ARGV[2] the bytes the caller read ('' = absent)  ARGV[3] new bytes ('' = delete)
-- ARGV[4] audit entry  ARGV[5] audit max entries  ARGV[6] max bundles
-- Returns 1 written, 0 lost a race (re-read and retry), -1 too many bundles.
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  if current == '' and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return -1 end
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
end
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[3], seq, ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[5]) + 1))
return 1
