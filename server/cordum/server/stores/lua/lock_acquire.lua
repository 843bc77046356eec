-- Acquire (or re-enter) a lock.
-- ARGV: prefix, tenant, resource, owner, mode (exclusive | shared), ttl_ms, max_owners
-- Returns reply('ok' | 'held' | 'full', lock).
local owner, mode, ttl, max_owners = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local exp = now + ttl
gc()
local lock = load()
if not lock then
  lock = {owners = {}, n = 1, mode = mode, fence = 0}
  if mode == 'exclusive' then lock.fence = redis.call('INCR', P .. 'locks:fence') end
  lock.owners[owner] = {1, exp}
else
  local mine = lock.owners[owner]
  if lock.mode == 'exclusive' then
    -- Re-entrant for its owner (also when `shared` is asked for: it stays exclusive and keeps
    -- its fencing token, so the outer hold's token stays valid).
    if not mine then
      lock.updated = redis.call('HGET', key, 'updated_ms')
      return reply('held', lock)
    end
    mine[1] = mine[1] + 1
    mine[2] = math.max(mine[2], exp)
  elseif mode == 'shared' then
    if mine then
      mine[1] = mine[1] + 1
      mine[2] = math.max(mine[2], exp)
    elseif lock.n >= max_owners then
      lock.updated = redis.call('HGET', key, 'updated_ms')
      return reply('full', lock)
    else
      lock.owners[owner] = {1, exp}
      lock.n = lock.n + 1
    end
  else
    -- Shared, exclusive asked for: only the sole owner may upgrade; that is a new exclusive
    -- hold, so it gets a new fencing token.
    if not mine or lock.n > 1 then
      lock.updated = redis.call('HGET', key, 'updated_ms')
      return reply('held', lock)
    end
    lock.mode = 'exclusive'
    lock.fence = redis.call('INCR', P .. 'locks:fence')
    mine[1] = mine[1] + 1
    mine[2] = math.max(mine[2], exp)
  end
end
save(lock)
return reply('ok', lock)
