-- Shared by the workflow scripts (prepended by the loader). Keys are built from the prefix
-- in ARGV[1]: one script call is one atomic update in one round trip.
local P = ARGV[1]

local function rkey(id) return P .. 'wf:run:' .. id end

-- Per-tenant listing indexes (all, by status, by workflow) and the active set.
local function index_run(id, tenant, wf, old_status, status, now, terminal)
  local base = P .. 'wf:runs:t:' .. tenant
  redis.call('ZADD', base, now, id)
  redis.call('ZADD', base .. ':w:' .. wf, now, id)
  if old_status and old_status ~= '' and old_status ~= status then
    redis.call('ZREM', base .. ':s:' .. old_status, id)
  end
  redis.call('ZADD', base .. ':s:' .. status, now, id)
  if terminal then
    redis.call('ZREM', P .. 'wf:runs:active', id)
  else
    redis.call('ZADD', P .. 'wf:runs:active', now, id)
  end
end

-- Append ARGV[first .. first+n-1] to the run's bounded timeline.
local function append_events(id, first, n, limit)
  if n <= 0 then return end
  local k = rkey(id) .. ':tl'
  for i = first, first + n - 1 do redis.call('RPUSH', k, ARGV[i]) end
  redis.call('LTRIM', k, -limit, -1)
end

-- One timer per run: when it next needs a pass (-1 = none).
local function set_timer(id, wake)
  if wake >= 0 then
    redis.call('ZADD', P .. 'wf:timers', wake, id)
  else
    redis.call('ZREM', P .. 'wf:timers', id)
  end
end

-- Terminal runs expire; active ones never do.
local function expire_run(id, terminal, ttl)
  local k = rkey(id)
  if terminal then
    redis.call('EXPIRE', k, ttl)
    redis.call('EXPIRE', k .. ':tl', ttl)
  else
    redis.call('PERSIST', k)
    redis.call('PERSIST', k .. ':tl')
  end
end
