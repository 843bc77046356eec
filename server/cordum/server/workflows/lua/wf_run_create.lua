-- Create a run: idempotency key, record, indexes, first timeline events, first timer.
-- ARGV: prefix, id, data, status, tenant, workflow_id, now_ms, def_bytes, def_key,
--       idem_key ('' = none), idem_value, idem_ttl_s, wake_ms, timeline_limit, n_events, events...
-- Returns {'ok'} | {'replay', idem_value} | {'exists'}
local id = ARGV[2]
local idem = ARGV[10]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then return {'replay', existing} end
end
local k = rkey(id)
if redis.call('EXISTS', k) == 1 then return {'exists'} end
if idem ~= '' then redis.call('SET', idem, ARGV[11], 'EX', tonumber(ARGV[12])) end
local n = tonumber(ARGV[15])
local tenant, wf, now = ARGV[5], ARGV[6], tonumber(ARGV[7])
redis.call('HSET', k, 'data', ARGV[3], 'ver', 1, 'seq', n, 'status', ARGV[4],
  'tenant', tenant, 'wf', wf, 'def', ARGV[8], 'defkey', ARGV[9], 'idem', idem,
  'created_ms', now, 'updated_ms', now)
redis.call('SADD', P .. 'wf:tenants', tenant)
index_run(id, tenant, wf, nil, ARGV[4], now, false)
append_events(id, 16, n, tonumber(ARGV[14]))
set_timer(id, tonumber(ARGV[13]))
return {'ok'}
