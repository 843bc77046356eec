-- A page of a run's timeline from sequence number `from` (1-based; older entries may have
-- been trimmed). ARGV: prefix, id, from, count.
-- Returns {} when the run does not exist, else {last_seq, event...}
local k = rkey(ARGV[2])
local seq = redis.call('HGET', k, 'seq')
if not seq then return {} end
seq = tonumber(seq)
local tl = k .. ':tl'
local len = redis.call('LLEN', tl)
local first = seq - len + 1
local from = math.max(tonumber(ARGV[3]), first)
local idx = from - first
local out = {seq}
if idx < len then
  local items = redis.call('LRANGE', tl, idx, idx + tonumber(ARGV[4]) - 1)
  for _, item in ipairs(items) do out[#out + 1] = item end
end
return out
