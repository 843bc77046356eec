-- Delete a DLQ entry and its index members, if it belongs to the tenant.
-- ARGV: prefix, job_id, tenant ('' = any tenant)
-- Returns 1 when deleted, 0 when there was no such entry (for this tenant).
local P, id = ARGV[1], ARGV[2]
local k = P .. 'dlq:' .. id
local tenant = redis.call('HGET', k, 'tenant')
if not tenant then return 0 end
if ARGV[3] ~= '' and tenant ~= ARGV[3] then return 0 end
redis.call('DEL', k)
redis.call('ZREM', P .. 'dlq:idx', id)
redis.call('ZREM', P .. 'dlq:idx:t:' .. tenant, id)
return 1
