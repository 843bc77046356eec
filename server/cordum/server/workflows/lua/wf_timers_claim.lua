-- Claim the runs whose timer is due: each is pushed `lease_ms` into the future, so another
-- engine does not take it too; the claimer's save sets the real next time. A claimer that
-- dies leaves the run to be claimed again when the lease ends.
-- ARGV: prefix, now_ms, limit, lease_ms. Returns run ids.
local key = P .. 'wf:timers'
local now = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', key, now + tonumber(ARGV[4]), id) end
return ids
