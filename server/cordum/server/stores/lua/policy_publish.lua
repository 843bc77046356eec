-- Publish a new immutable policy version and make it current, with its audit entry.
-- KEYS[1] policy:current  KEYS[2] policy:version:<n>  KEYS[3] policy:versions (ZSET n → n)
-- KEYS[4] policy:snapshots (HASH snapshot → n)  KEYS[5] policy:audit  KEYS[6] policy:audit:seq
-- ARGV[1] the current version the caller built on ('' = none)  ARGV[2] n
-- ARGV[3] version bytes  ARGV[4] snapshot  ARGV[5] audit entry  ARGV[6] audit max entries
-- Returns 1 published, 0 another publish won (re-read and retry).
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
if redis.call('SET', KEYS[2], ARGV[3], 'NX') == false then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[2]) end
local seq = redis.call('INCR', KEYS[6])
redis.call('ZADD', KEYS[5], seq, ARGV[5])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -(tonumber(ARGV[6]) + 1))
return 1
