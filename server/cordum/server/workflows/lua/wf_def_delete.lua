-- Delete a workflow definition and its index entry. Runs keep their own snapshot.
-- ARGV: prefix, id. Returns 1 | 0
local k = P .. 'wf:def:' .. ARGV[2]
local tenant = redis.call('HGET', k, 'tenant')
if not tenant then return 0 end
redis.call('DEL', k)
redis.call('ZREM', P .. 'wf:defs:t:' .. tenant, ARGV[2])
return 1
