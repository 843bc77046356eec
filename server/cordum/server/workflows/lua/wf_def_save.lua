-- Save a workflow definition if its revision is still the one the caller read.
-- ARGV: prefix, id, expected_rev (0 = must not exist), data, tenant, now_ms
-- Returns {'ok'} | {'conflict', current_rev}
local k = P .. 'wf:def:' .. ARGV[2]
local f = redis.call('HMGET', k, 'rev', 'tenant')
local rev = tonumber(f[1]) or 0
if rev ~= tonumber(ARGV[3]) then return {'conflict', rev} end
local tenant, now = ARGV[5], tonumber(ARGV[6])
redis.call('HSET', k, 'data', ARGV[4], 'rev', rev + 1, 'tenant', tenant, 'updated_ms', now)
if f[2] and f[2] ~= tenant then redis.call('ZREM', P .. 'wf:defs:t:' .. f[2], ARGV[2]) end
redis.call('ZADD', P .. 'wf:defs:t:' .. tenant, now, ARGV[2])
return {'ok'}
