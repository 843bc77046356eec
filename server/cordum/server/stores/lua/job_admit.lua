-- The scheduler's decision for a PENDING job, applied atomically: record the safety
-- decision, then approval / deny / throttle / retry cap / tenant concurrency / dispatch.
-- ARGV: prefix, id, now_ms, ttl_s, event_limit,
--       decision ('allow'|'deny'|'require'|'throttle'|'fail'),
--       decision_bytes, job_hash, snapshot, worker_id, subject, max_retries_cap (-1 = none),
--       deadline_ms (0 = none), max_concurrent (0 = none), retry_after_ms, reason,
--       dlq_max, decisions_limit, fail_code,
--       approved_decision ('allow'|'throttle'|'fail'|'' : what a 'require' becomes when the
--       job's stored approval matches), approved_reason, dispatcher (the scheduler instance
--       that publishes the dispatch; the reconciler re-queues its jobs if it dies first)
-- Returns {'dispatched', attempts, deadline_ms, max_retries} | {'approval'} | {'denied'} |
--         {'throttled', reason} | {'failed', reason} | {'duplicate', state} | {'missing'}
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', jkey(id), 'state', 'tenant', 'approved_hash', 'approved_snapshot',
  'attempts', 'max_retries', 'deadline_ms', 'created_ms')
local state = f[1]
if not state then return {'missing'} end
if state ~= 'PENDING' then return {'duplicate', state} end
local deadline = tonumber(f[7]) or 0
local J = {id = id, tenant = f[2], from = state, created = f[8], deadline = deadline > 0}
return admit(J, 0, now, ttl, limit, {f[3], f[4]}, tonumber(f[5]) or 0, tonumber(f[6]) or 0,
  deadline)
