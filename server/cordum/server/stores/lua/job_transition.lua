-- A guarded state change (cancel, timeout, approval, re-queue): compare-and-set on the
-- current state, then the same bookkeeping as every transition.
-- ARGV: prefix, id, now_ms, ttl_s, event_limit, allowed_from (comma list), to_state, message,
--       dlq_status ('' = no DLQ entry), dlq_code, dlq_max, n, then n field/value pairs the
--       record must hold (e.g. the dispatch a re-queue is about: a result or a newer dispatch
--       that landed meanwhile wins), then field/value pairs to set
-- Returns {'ok', previous_state, worker_id, subject, trace_id, topic} | {'rejected', state} |
--         {'missing'}
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local k = jkey(id)
local f = redis.call('HMGET', k, 'state', 'tenant', 'worker_id', 'subject', 'trace_id',
  'created_ms', 'deadline_ms', 'topic')
local state, tenant = f[1], f[2]
if not state then return {'missing'} end
local allowed = false
for s in string.gmatch(ARGV[6], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {'rejected', state} end
local n = tonumber(ARGV[12])
for i = 13, 12 + 2 * n, 2 do
  if (redis.call('HGET', k, ARGV[i]) or '') ~= ARGV[i + 1] then return {'rejected', state} end
end
local to = ARGV[7]
local extra = {}
for i = 13 + 2 * n, #ARGV do extra[#extra + 1] = ARGV[i] end
if to == 'PENDING' then redis.call('SREM', P .. 'jobs:inflight:t:' .. tenant, id) end
local J = {id = id, tenant = tenant, from = state, created = f[6],
  deadline = (tonumber(f[7]) or 0) > 0}
move(J, to, now, ARGV[8], limit, ttl, extra)
if ARGV[9] ~= '' then dlq_add(id, now, ARGV[9], ARGV[10], ARGV[8], tonumber(ARGV[11])) end
return {'ok', state, f[3] or '', f[4] or '', f[5] or '', f[8] or ''}
