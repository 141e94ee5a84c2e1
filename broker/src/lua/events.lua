-- events.lua: what the queue tells the world — lifecycle events in the capped events stream
-- (`fleetq:{q}:events`) and counters in the stats hash (`fleetq:{q}:stats`).
--
-- The events every job goes through on its way to success (queued, taken, started,
-- succeeded) are routine: written only when the queue's config sets routine_events 1, or,
-- for the end, when someone watches the job (fleetq_watch). The rest (progress, retries,
-- timeouts, failures, dead letters, cancellations, node suspensions) are always written.
-- Nothing waits on events: `wait` and `watch` are woken through the job's notify list.

local ROUTINE = { queued = true, taken = true, started = true, succeeded = true }

-- Writes event `kind` of `job_id`; `extra` more field/value pairs. `watched`: someone waits on
-- the job, so a routine event is written too.
local function emit(K, kind, job_id, extra, watched)
  local maxlen = config_num(K, 'events_maxlen', DEFAULT_EVENTS_MAXLEN)
  if maxlen <= 0 then return end
  if ROUTINE[kind] and not watched and config_num(K, 'routine_events', 0) ~= 1 then return end
  local args = { 'XADD', K.events, 'MAXLEN', '~', maxlen, '*', 'type', kind, 'job', job_id }
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

local function stat(K, field, n)
  redis.call('HINCRBY', K.stats, field, n or 1)
end
