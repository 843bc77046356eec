-- Shared by every job script (prepended by the loader). Keys are built from a prefix passed
-- in ARGV[1], so one script call does a whole transition in one round trip.
-- Job states: PENDING APPROVAL_REQUIRED SCHEDULED DISPATCHED RUNNING (active)
--             SUCCEEDED FAILED CANCELLED TIMEOUT DENIED (terminal, final)
local P = ARGV[1]
local TERMINAL = {SUCCEEDED=true, FAILED=true, CANCELLED=true, TIMEOUT=true, DENIED=true}
-- States a job holds while a worker may have it (in the tenant's in-flight set, never due).
local PLACED = {DISPATCHED=true, RUNNING=true}

local function jkey(id) return P .. 'job:' .. id end
local function ekey(id) return P .. 'job:' .. id .. ':events' end
local function dkey(id) return P .. 'job:' .. id .. ':decisions' end

local function push(list, ...)
  for _, v in ipairs({...}) do list[#list + 1] = v end
end

-- Append to a job's bounded event log (TTL set once, trimmed only when over its bound).
local function log_event(id, now, state, msg, limit, ttl)
  local k = ekey(id)
  local n = redis.call('RPUSH', k, now .. '|' .. state .. '|' .. msg)
  if n == 1 then
    redis.call('EXPIRE', k, ttl)
  elseif n > limit then
    redis.call('LTRIM', k, -limit, -1)
  end
end

-- Move job J between states: one HSET (state plus J.fields and `extra` field/value pairs),
-- per-tenant indexes, active sets, event log.
-- J = {id, tenant, from (nil: created by this call, not indexed yet), created (created_ms;
--      read when absent), deadline (false: no jobs:deadline entry), new (EXPIRE once set)}.
-- Listing indexes are scored by creation time, which never changes, so pages stay stable
-- while jobs move; the active sets are scored by the time of the last change (staleness).
local function move(J, to, now, msg, limit, ttl, extra)
  local id, from = J.id, J.from
  local k = jkey(id)
  local fields = J.fields or {}
  if extra then
    for _, v in ipairs(extra) do fields[#fields + 1] = v end
  end
  if from == nil and to ~= 'PENDING' then
    -- A job admitted by the script that created it: its log still starts at submission.
    log_event(id, now, 'PENDING', 'submitted', limit, ttl)
  end
  if TERMINAL[to] then
    redis.call('HSET', k, 'state', to, 'updated_ms', now, 'last_state', from or '', unpack(fields))
  else
    redis.call('HSET', k, 'state', to, 'updated_ms', now, unpack(fields))
  end
  if J.new then
    redis.call('EXPIRE', k, ttl)
    J.new = false
  end
  local created = J.created
  if not created then created = redis.call('HGET', k, 'created_ms') or now end
  local base = P .. 'jobs:t:' .. J.tenant
  if from then
    redis.call('ZREM', base .. ':s:' .. from, id)
    redis.call('ZREM', P .. 'jobs:active:' .. from, id)
  else
    redis.call('ZADD', base, created, id)
  end
  redis.call('ZADD', base .. ':s:' .. to, created, id)
  if TERMINAL[to] then
    -- Only a job waiting to be (re)admitted can be due; only a placed one is in flight.
    if from and not PLACED[from] then redis.call('ZREM', P .. 'jobs:due', id) end
    if J.deadline ~= false then redis.call('ZREM', P .. 'jobs:deadline', id) end
    if from and from ~= 'PENDING' and from ~= 'APPROVAL_REQUIRED' then
      redis.call('SREM', P .. 'jobs:inflight:t:' .. J.tenant, id)
    end
  else
    redis.call('ZADD', P .. 'jobs:active:' .. to, now, id)
  end
  log_event(id, now, to, msg, limit, ttl)
  J.fields, J.from = {}, to
end

-- Write a DLQ entry for a job that ended without success; the index is bounded.
local function dlq_add(id, now, status, reason_code, reason, max_entries)
  local k = jkey(id)
  local f = redis.call('HMGET', k, 'topic', 'tenant', 'trace_id', 'attempts', 'last_state')
  local dk = P .. 'dlq:' .. id
  redis.call('HSET', dk, 'job_id', id, 'topic', f[1] or '', 'tenant', f[2] or '',
    'trace_id', f[3] or '', 'attempts', f[4] or '0', 'last_state', f[5] or '',
    'status', status, 'reason_code', reason_code, 'reason', reason, 'created_ms', now)
  local idx = P .. 'dlq:idx:t:' .. (f[2] or '')
  redis.call('ZADD', idx, now, id)
  redis.call('ZADD', P .. 'dlq:idx', now, id)
  local n = redis.call('ZCARD', P .. 'dlq:idx')
  if n > max_entries then
    local old = redis.call('ZRANGE', P .. 'dlq:idx', 0, n - max_entries - 1)
    for _, oid in ipairs(old) do
      local t = redis.call('HGET', P .. 'dlq:' .. oid, 'tenant')
      if t then redis.call('ZREM', P .. 'dlq:idx:t:' .. t, oid) end
      redis.call('DEL', P .. 'dlq:' .. oid)
      redis.call('ZREM', P .. 'dlq:idx', oid)
    end
  end
end

-- Create a job from the submit arguments ARGV[6..17] (see job_submit.lua). Returns J for
-- `move` (the record's fields ride on its first HSET), or nil and the reply when nothing
-- was written (an idempotency replay or an id that exists).
local function create_job(id, now, ttl)
  local idem = ARGV[15]
  if idem ~= '' then
    local existing = redis.call('GET', idem)
    if existing then return nil, {'replay', existing} end
  end
  local k = jkey(id)
  if redis.call('EXISTS', k) == 1 then return nil, {'exists'} end
  if idem ~= '' then redis.call('SET', idem, id, 'EX', tonumber(ARGV[16])) end
  -- CAP clients submitting on the bus bring their own context pointer: no ctx key then.
  if ARGV[6] ~= '' then redis.call('SET', ARGV[6], ARGV[7], 'EX', ttl) end
  local tenant, trace, deadline = ARGV[10], ARGV[12], tonumber(ARGV[14])
  redis.call('SADD', P .. 'jobs:tenants', tenant)
  if deadline > 0 then redis.call('ZADD', P .. 'jobs:deadline', deadline, id) end
  if trace ~= '' then
    local tk = P .. 'trace:' .. trace
    redis.call('SADD', tk, id)
    redis.call('EXPIRE', tk, ttl)
  end
  return {id = id, tenant = tenant, created = now, deadline = deadline > 0, new = true,
    fields = {'job', ARGV[8], 'req', ARGV[9], 'tenant', tenant, 'topic', ARGV[11],
      'trace_id', trace, 'max_retries', ARGV[13], 'deadline_ms', ARGV[14], 'attempts', 0,
      'created_ms', now, 'parent_job_id', ARGV[17]}}
end

-- The scheduler's decision for PENDING job J, from the admit arguments at ARGV[o+6..o+22]
-- (see job_admit.lua; o = 0 there). `approved` = the stored {hash, snapshot} of an approval,
-- `attempts` / `max_retries` / `deadline` the job's current values.
local function admit(J, o, now, ttl, limit, approved, attempts, max_retries, deadline)
  local function A(i) return ARGV[o + i] end
  local id = J.id
  local decision, reason = A(6), A(16)
  -- An approval is bound to the job's hash and the policy snapshot it was granted under.
  -- The caller sends what the job becomes once approved (placement included), since a
  -- 'require' decision alone carries no worker or subject to dispatch to.
  if decision == 'require' and A(20) ~= '' and approved[1] == A(8) and approved[2] == A(9) then
    decision, reason = A(20), A(21)
  end
  local extra = {}
  if A(7) ~= '' then
    push(extra, 'safety', A(7))
    local dk = dkey(id)
    local n = redis.call('LPUSH', dk, A(7))
    if n == 1 then
      redis.call('EXPIRE', dk, ttl)
    elseif n > tonumber(A(18)) then
      redis.call('LTRIM', dk, 0, tonumber(A(18)) - 1)
    end
  end
  -- The job stays PENDING (a new one is indexed as such) with `extra` written.
  local function stay()
    if J.from == nil then
      move(J, 'PENDING', now, 'submitted', limit, ttl, extra)
    elseif #extra > 0 then
      redis.call('HSET', jkey(id), unpack(extra))
    end
  end

  if decision == 'require' then
    push(extra, 'job_hash', A(8), 'pending_reason', '')
    move(J, 'APPROVAL_REQUIRED', now, 'approval required: ' .. reason, limit, ttl, extra)
    return {'approval'}
  end
  if decision == 'deny' then
    move(J, 'DENIED', now, 'denied: ' .. reason, limit, ttl, extra)
    dlq_add(id, now, 'JOB_STATUS_DENIED', 'safety_denied', reason, tonumber(A(17)))
    return {'denied'}
  end
  if decision == 'fail' then
    move(J, 'FAILED', now, reason, limit, ttl, extra)
    dlq_add(id, now, 'JOB_STATUS_FAILED', A(19), reason, tonumber(A(17)))
    return {'failed', reason}
  end
  if decision == 'throttle' then
    push(extra, 'pending_reason', 'throttled: ' .. reason)
    stay()
    redis.call('ZADD', P .. 'jobs:due', now + tonumber(A(15)), id)
    return {'throttled', reason}
  end

  -- allow
  local cap = tonumber(A(12))
  if cap >= 0 and cap < max_retries then
    max_retries = cap
    push(extra, 'max_retries', cap)
  end
  if attempts >= max_retries + 1 then
    local why = 'max retries exceeded (attempts=' .. attempts .. ', max_retries=' .. max_retries .. ')'
    move(J, 'FAILED', now, why, limit, ttl, extra)
    dlq_add(id, now, 'JOB_STATUS_FAILED', 'max_retries_exceeded', why, tonumber(A(17)))
    return {'failed', why}
  end
  local inflight = P .. 'jobs:inflight:t:' .. J.tenant
  local max_concurrent = tonumber(A(14))
  if max_concurrent > 0 and redis.call('SCARD', inflight) >= max_concurrent then
    local why = 'tenant concurrency limit ' .. max_concurrent .. ' reached'
    push(extra, 'pending_reason', why)
    stay()
    redis.call('ZADD', P .. 'jobs:due', now + 1000, id)
    return {'throttled', why}
  end
  local bound = tonumber(A(13))
  if bound > 0 and (deadline == 0 or bound < deadline) then
    deadline = bound
    J.deadline = true
    push(extra, 'deadline_ms', deadline)
    redis.call('ZADD', P .. 'jobs:deadline', deadline, id)
  end
  attempts = attempts + 1
  push(extra, 'attempts', attempts, 'worker_id', A(10), 'subject', A(11), 'dispatched_ms', now,
    'pending_reason', '', 'dispatcher', A(22))
  redis.call('SADD', inflight, id)
  redis.call('EXPIRE', inflight, ttl)
  move(J, 'DISPATCHED', now, 'dispatched to ' .. A(11), limit, ttl, extra)
  return {'dispatched', attempts, deadline, max_retries}
end
