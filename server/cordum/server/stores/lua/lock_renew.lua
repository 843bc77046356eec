-- Renew the caller's hold: its expiry becomes now + ttl_ms (other owners keep theirs).
-- ARGV: prefix, tenant, resource, owner, ttl_ms
-- Returns {'missing'} | reply('ok' | 'not_held', lock).
local owner, ttl = ARGV[4], tonumber(ARGV[5])
gc()
local lock = load()
if not lock then return {'missing'} end
local mine = lock.owners[owner]
if not mine then
  lock.updated = redis.call('HGET', key, 'updated_ms')
  return reply('not_held', lock)
end
mine[2] = now + ttl
save(lock)
return reply('ok', lock)
