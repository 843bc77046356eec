-- A worker's result. Terminal jobs are final: a late or duplicate result is recorded in the
-- event log and ignored (never looped on). Failures within the retry budget go back to
-- PENDING with a backoff instead.
-- ARGV: prefix, id, now_ms, ttl_s, event_limit, status (a terminal state name), result_ptr,
--       worker_id, exec_ms, error_code, error_message, artifacts_json, res_key, res_ttl_s,
--       backoff_base_ms (-1 = never retry), dlq_max, backoff_cap_ms,
--       want_record ('1': a 'done' reply also carries the record and the result, for a
--       caller waiting in this process, saving it a read)
-- Returns {'done', state[, HGETALL of the record, GET of res_key], topic} |
--         {'retry', attempts, topic} | {'ignored', state} | {'unknown'}
-- (the topic labels the caller's transition metrics: read with the fields it reads anyway)
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local status = ARGV[6]
local k = jkey(id)
local f = redis.call('HMGET', k, 'state', 'tenant', 'attempts', 'max_retries', 'created_ms',
  'deadline_ms', 'topic')
local topic = f[7] or ''
local state, tenant = f[1], f[2]
if not state then return {'unknown'} end
-- Workers write res:<id> without a TTL; we own its hygiene (no-op when it is absent).
if ARGV[13] ~= '' then redis.call('EXPIRE', ARGV[13], tonumber(ARGV[14])) end
-- A PENDING job takes only a success, and only from an earlier attempt (a job re-queued
-- after its worker went silent may still finish there). A job never dispatched cannot
-- have a result: accepting one would end it without a safety decision.
local attempts, max_retries = tonumber(f[3]) or 0, tonumber(f[4]) or 0
if TERMINAL[state] or state == 'APPROVAL_REQUIRED'
   or (state == 'PENDING' and (status ~= 'SUCCEEDED' or attempts == 0)) then
  log_event(id, now, state, 'ignored late result ' .. status .. ' from ' .. ARGV[8], limit, ttl)
  return {'ignored', state}
end
local J = {id = id, tenant = tenant, from = state, created = f[5],
  deadline = (tonumber(f[6]) or 0) > 0}
local extra = {'worker_id', ARGV[8], 'exec_ms', ARGV[9], 'error_code', ARGV[10],
  'error_message', ARGV[11], 'artifacts', ARGV[12]}
local function done(final)
  if ARGV[18] == '1' then
    local result = false
    if ARGV[13] ~= '' then result = redis.call('GET', ARGV[13]) end
    return {'done', final, redis.call('HGETALL', k), result, topic}
  end
  return {'done', final, topic}
end
if status == 'SUCCEEDED' then
  push(extra, 'result_ptr', ARGV[7])
  move(J, 'SUCCEEDED', now, 'succeeded on ' .. ARGV[8], limit, ttl, extra)
  return done('SUCCEEDED')
end
local base = tonumber(ARGV[15])
if (status == 'FAILED' or status == 'TIMEOUT') and base >= 0 and attempts <= max_retries then
  local backoff = math.min(tonumber(ARGV[17]), base * 2 ^ math.max(attempts - 1, 0))
  push(extra, 'pending_reason', 'retrying after ' .. status .. ': ' .. ARGV[11])
  redis.call('SREM', P .. 'jobs:inflight:t:' .. tenant, id)
  redis.call('ZADD', P .. 'jobs:due', now + backoff, id)
  move(J, 'PENDING', now, 'attempt ' .. attempts .. ' ' .. status .. ': ' .. ARGV[11], limit,
    ttl, extra)
  return {'retry', attempts, topic}
end
move(J, status, now, status .. ': ' .. ARGV[11], limit, ttl, extra)
local code = ARGV[10]
if code == '' then code = string.lower(status) end
dlq_add(id, now, 'JOB_STATUS_' .. status, code, ARGV[11], tonumber(ARGV[16]))
return done(status)
