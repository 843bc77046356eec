-- Take up to N jobs whose delay is over (throttle, retry backoff, kernel outage) off the
-- due queue. Atomic, so scheduler replicas never claim the same job.
-- ARGV: prefix, now_ms, limit
local key = P .. 'jobs:due'
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
if #ids > 0 then redis.call('ZREM', key, unpack(ids)) end
return ids
