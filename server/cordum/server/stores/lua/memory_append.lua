-- Append a turn to a memory's chat history, keep its newest entries, refresh its TTL.
-- One key only, so it runs on Redis Cluster too.
-- KEYS[1] mem:<memory_id>:events
-- ARGV[1] how many entries to keep (> 0)
-- ARGV[2] TTL in seconds
-- ARGV[3..] the entries (JSON {role, content, ts}), oldest first
-- Returns {entries, bytes}: the history's length and total size after the trim.
local key = KEYS[1]
redis.call('RPUSH', key, unpack(ARGV, 3))
redis.call('LTRIM', key, -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', key, tonumber(ARGV[2]))
local bytes = 0
local items = redis.call('LRANGE', key, 0, -1)
for _, item in ipairs(items) do
  bytes = bytes + #item
end
return {#items, bytes}
