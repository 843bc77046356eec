-- Delete a run and everything that names it (indexes, timer, timeline, idempotency key).
-- ARGV: prefix, id. Returns {'ok'} | {'missing'}
local id = ARGV[2]
local k = rkey(id)
local f = redis.call('HMGET', k, 'tenant', 'wf', 'status', 'idem')
if not f[1] then return {'missing'} end
local base = P .. 'wf:runs:t:' .. f[1]
redis.call('ZREM', base, id)
redis.call('ZREM', base .. ':w:' .. f[2], id)
redis.call('ZREM', base .. ':s:' .. f[3], id)
redis.call('ZREM', P .. 'wf:runs:active', id)
redis.call('ZREM', P .. 'wf:timers', id)
if f[4] and f[4] ~= '' then
  local v = redis.call('GET', f[4])
  if v and string.sub(v, 1, #id + 1) == id .. '|' then redis.call('DEL', f[4]) end
end
redis.call('DEL', k, k .. ':tl')
return {'ok'}
