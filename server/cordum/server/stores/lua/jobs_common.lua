-- Shared by every job script (prepended by the loader). Keys are built from a prefix passed
-- in ARGV[1], so one script call does a whole transition in one round trip.
-- Job states: PENDING APPROVAL_REQUIRED SCHEDULED DISPATCHED RUNNING (active)
--             SUCCEEDED FAILED CANCELLED TIMEOUT DENIED (terminal, final)
local P = ARGV[1]
local TERMINAL = {SUCCEEDED=true, FAILED=true, CANCELLED=true, TIMEOUT=true, DENIED=true}

local function jkey(id) return P .. 'job:' .. id end
local function ekey(id) return P .. 'job:' .. id .. ':events' end
local function dkey(id) return P .. 'job:' .. id .. ':decisions' end

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

-- Move a job between states: hash, per-tenant indexes, active sets, event log.
-- Listing indexes are scored by creation time, which never changes, so pages stay stable
-- while jobs move; the active sets are scored by the time of the last change (staleness).
local function set_state(id, tenant, from, to, now, msg, limit, ttl)
  local k = jkey(id)
  redis.call('HSET', k, 'state', to, 'updated_ms', now)
  local base = P .. 'jobs:t:' .. tenant
  local created = tonumber(redis.call('HGET', k, 'created_ms')) or now
  if from and from ~= '' then
    redis.call('ZREM', base .. ':s:' .. from, id)
    redis.call('ZREM', P .. 'jobs:active:' .. from, id)
  else
    redis.call('ZADD', base, created, id)
  end
  redis.call('ZADD', base .. ':s:' .. to, created, id)
  if TERMINAL[to] then
    redis.call('HSET', k, 'last_state', from or '')
    redis.call('ZREM', P .. 'jobs:due', id)
    redis.call('ZREM', P .. 'jobs:deadline', id)
    redis.call('SREM', P .. 'jobs:inflight:t:' .. tenant, id)
  else
    redis.call('ZADD', P .. 'jobs:active:' .. to, now, id)
  end
  log_event(id, now, to, msg, limit, ttl)
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
