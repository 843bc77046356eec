-- Create a job and apply the scheduler's decision for it in the same call (gateway and
-- scheduler in one process: the decision is taken before the write). Same effects as
-- job_submit.lua followed by job_admit.lua, without indexing the job as PENDING in between.
-- ARGV: job_submit.lua's 1..17, then job_admit.lua's 6..22 at 18..34
-- Returns job_submit.lua's {'replay', id} | {'exists'} (nothing written, nothing admitted),
-- else {'ok', <job_admit.lua's reply>...}
local id, now, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local J, reply = create_job(id, now, ttl)
if not J then return reply end
local admitted = admit(J, 12, now, ttl, limit, {}, 0, tonumber(ARGV[13]) or 0,
  tonumber(ARGV[14]) or 0)
table.insert(admitted, 1, 'ok')
return admitted
