-- Set a run's timer only if the run is still at the version it was computed from.
-- ARGV: prefix, id, ver, wake_ms (-1 = none). Returns 1 | 0
local v = redis.call('HGET', rkey(ARGV[2]), 'ver')
if v ~= ARGV[3] then return 0 end
set_timer(ARGV[2], tonumber(ARGV[4]))
return 1
