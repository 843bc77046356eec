-- Compare-and-set of one string key on its whole current value.
-- KEYS[1] the key
-- ARGV[1] the value the caller read ('' = the key must be absent)
-- ARGV[2] the new value
-- Returns 1 when written, 0 when the key no longer holds ARGV[1].
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
