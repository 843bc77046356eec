-- Compare-and-set one run update: the new Run bytes, status indexes, timeline events and the
-- run's timer, all or nothing. The version makes concurrent engines (and the gateway) safe:
-- a writer that read an older version gets 'conflict', reloads and recomputes.
-- ARGV: prefix, id, expected_ver, data, status, now_ms, terminal (0/1), ttl_s, wake_ms,
--       timeline_limit, n_events, events...
-- Returns {'ok', new_ver, previous_status} | {'conflict', current_ver} | {'missing'}
local id = ARGV[2]
local k = rkey(id)
local f = redis.call('HMGET', k, 'ver', 'status', 'tenant', 'wf', 'seq')
if not f[1] then return {'missing'} end
if f[1] ~= ARGV[3] then return {'conflict', f[1]} end
local ver = tonumber(f[1]) + 1
local n = tonumber(ARGV[11])
local now = tonumber(ARGV[6])
local terminal = ARGV[7] == '1'
redis.call('HSET', k, 'data', ARGV[4], 'ver', ver, 'status', ARGV[5], 'updated_ms', now,
  'seq', (tonumber(f[5]) or 0) + n)
index_run(id, f[3], f[4], f[2], ARGV[5], now, terminal)
append_events(id, 12, n, tonumber(ARGV[10]))
set_timer(id, tonumber(ARGV[9]))
expire_run(id, terminal, tonumber(ARGV[8]))
return {'ok', ver, f[2] or ''}
