-- Create a job (gateway submit): idempotency, input, record, indexes in one round trip.
-- ARGV: prefix, id, now_ms, ttl_s, event_limit, ctx_key, ctx_json, job_bytes, req_bytes,
--       tenant, topic, trace_id, max_retries, deadline_ms, idem_key ('' = none), idem_ttl_s,
--       parent_job_id
-- Returns {'ok'} | {'replay', existing_id} | {'exists'}
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local idem = ARGV[15]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then return {'replay', existing} end
end
local k = jkey(id)
if redis.call('EXISTS', k) == 1 then return {'exists'} end
if idem ~= '' then redis.call('SET', idem, id, 'EX', tonumber(ARGV[16])) end
-- CAP clients submitting on the bus bring their own context pointer: no ctx key then.
if ARGV[6] ~= '' then redis.call('SET', ARGV[6], ARGV[7], 'EX', ttl) end
local tenant, trace = ARGV[10], ARGV[12]
redis.call('HSET', k, 'job', ARGV[8], 'req', ARGV[9], 'tenant', tenant, 'topic', ARGV[11],
  'trace_id', trace, 'max_retries', ARGV[13], 'deadline_ms', ARGV[14], 'attempts', 0,
  'created_ms', now, 'parent_job_id', ARGV[17])
redis.call('EXPIRE', k, ttl)
redis.call('SADD', P .. 'jobs:tenants', tenant)
set_state(id, tenant, nil, 'PENDING', now, 'submitted', limit, ttl)
if tonumber(ARGV[14]) > 0 then redis.call('ZADD', P .. 'jobs:deadline', ARGV[14], id) end
if trace ~= '' then
  local tk = P .. 'trace:' .. trace
  redis.call('SADD', tk, id)
  redis.call('EXPIRE', tk, ttl)
end
return {'ok'}
