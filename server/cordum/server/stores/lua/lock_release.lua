-- Release one hold of a lock.
-- ARGV: prefix, tenant, resource, owner
-- Returns {'missing'} | {'released'} (nobody holds it any more) | reply('ok' | 'not_held', lock).
local owner = ARGV[4]
gc()
local lock = load()
if not lock then return {'missing'} end
local mine = lock.owners[owner]
if not mine then
  lock.updated = redis.call('HGET', key, 'updated_ms')
  return reply('not_held', lock)
end
if mine[1] > 1 then
  mine[1] = mine[1] - 1
else
  lock.owners[owner] = nil
  lock.n = lock.n - 1
  redis.call('HDEL', key, 'o:' .. owner)
end
if lock.n == 0 then
  redis.call('DEL', key)
  unindex(member)
  return {'released'}
end
save(lock)
return reply('ok', lock)
