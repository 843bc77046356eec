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
local decision, reason = ARGV[6], ARGV[16]
local k = jkey(id)
local f = redis.call('HMGET', k, 'state', 'tenant', 'approved_hash', 'approved_snapshot',
  'attempts', 'max_retries', 'deadline_ms')
local state, tenant = f[1], f[2]
if not state then return {'missing'} end
if state ~= 'PENDING' then return {'duplicate', state} end

-- An approval is bound to the job's hash and the policy snapshot it was granted under.
-- The caller sends what the job becomes once approved (placement included), since a
-- 'require' decision alone carries no worker or subject to dispatch to.
if decision == 'require' and ARGV[20] ~= '' and f[3] == ARGV[8] and f[4] == ARGV[9] then
  decision, reason = ARGV[20], ARGV[21]
end

if ARGV[7] ~= '' then
  redis.call('HSET', k, 'safety', ARGV[7])
  local dk = dkey(id)
  redis.call('LPUSH', dk, ARGV[7])
  redis.call('LTRIM', dk, 0, tonumber(ARGV[18]) - 1)
  redis.call('EXPIRE', dk, ttl)
end

if decision == 'require' then
  redis.call('HSET', k, 'job_hash', ARGV[8], 'pending_reason', '')
  set_state(id, tenant, state, 'APPROVAL_REQUIRED', now, 'approval required: ' .. reason, limit, ttl)
  return {'approval'}
end
if decision == 'deny' then
  set_state(id, tenant, state, 'DENIED', now, 'denied: ' .. reason, limit, ttl)
  dlq_add(id, now, 'JOB_STATUS_DENIED', 'safety_denied', reason, tonumber(ARGV[17]))
  return {'denied'}
end
if decision == 'fail' then
  set_state(id, tenant, state, 'FAILED', now, reason, limit, ttl)
  dlq_add(id, now, 'JOB_STATUS_FAILED', ARGV[19], reason, tonumber(ARGV[17]))
  return {'failed', reason}
end
if decision == 'throttle' then
  redis.call('HSET', k, 'pending_reason', 'throttled: ' .. reason)
  redis.call('ZADD', P .. 'jobs:due', now + tonumber(ARGV[15]), id)
  return {'throttled', reason}
end

-- allow
local max_retries = tonumber(f[6]) or 0
local cap = tonumber(ARGV[12])
if cap >= 0 and cap < max_retries then
  max_retries = cap
  redis.call('HSET', k, 'max_retries', cap)
end
local attempts = tonumber(f[5]) or 0
if attempts >= max_retries + 1 then
  local why = 'max retries exceeded (attempts=' .. attempts .. ', max_retries=' .. max_retries .. ')'
  set_state(id, tenant, state, 'FAILED', now, why, limit, ttl)
  dlq_add(id, now, 'JOB_STATUS_FAILED', 'max_retries_exceeded', why, tonumber(ARGV[17]))
  return {'failed', why}
end
local inflight = P .. 'jobs:inflight:t:' .. tenant
local max_concurrent = tonumber(ARGV[14])
if max_concurrent > 0 and redis.call('SCARD', inflight) >= max_concurrent then
  local why = 'tenant concurrency limit ' .. max_concurrent .. ' reached'
  redis.call('HSET', k, 'pending_reason', why)
  redis.call('ZADD', P .. 'jobs:due', now + 1000, id)
  return {'throttled', why}
end
local deadline = tonumber(f[7]) or 0
local bound = tonumber(ARGV[13])
if bound > 0 and (deadline == 0 or bound < deadline) then
  deadline = bound
  redis.call('HSET', k, 'deadline_ms', deadline)
  redis.call('ZADD', P .. 'jobs:deadline', deadline, id)
end
attempts = attempts + 1
redis.call('HSET', k, 'attempts', attempts, 'worker_id', ARGV[10], 'subject', ARGV[11],
  'dispatched_ms', now, 'pending_reason', '', 'dispatcher', ARGV[22])
redis.call('SADD', inflight, id)
redis.call('EXPIRE', inflight, ttl)
set_state(id, tenant, state, 'DISPATCHED', now, 'dispatched to ' .. ARGV[11], limit, ttl)
return {'dispatched', attempts, deadline, max_retries}
