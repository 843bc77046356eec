-- Record a retry job on its DLQ entry: `retries` counts every retry, `retry_job_ids` keeps the
-- newest `keep` ids (space-separated; job ids contain no spaces). Never recreates an entry
-- deleted (or trimmed away) meanwhile.
-- ARGV: prefix, job_id, retry_job_id, keep
-- Returns the new retry count, or 0 when the entry is gone.
local k = ARGV[1] .. 'dlq:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
local ids = {}
local raw = redis.call('HGET', k, 'retry_job_ids')
if raw then
  for id in string.gmatch(raw, '%S+') do ids[#ids + 1] = id end
end
ids[#ids + 1] = ARGV[3]
local keep = tonumber(ARGV[4])
while #ids > keep do table.remove(ids, 1) end
redis.call('HSET', k, 'retry_job_ids', table.concat(ids, ' '))
return redis.call('HINCRBY', k, 'retries', 1)
