-- Create a job (gateway submit): idempotency, input, record, indexes in one round trip.
-- ARGV: prefix, id, now_ms, ttl_s, event_limit, ctx_key, ctx_json, job_bytes, req_bytes,
--       tenant, topic, trace_id, max_retries, deadline_ms, idem_key ('' = none), idem_ttl_s,
--       parent_job_id
-- Returns {'ok'} | {'replay', existing_id} | {'exists'}
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local J, reply = create_job(id, now, ttl)
if not J then return reply end
move(J, 'PENDING', now, 'submitted', limit, ttl)
return {'ok'}
