-- events.lua: what the queue tells the world — lifecycle events in the capped events stream
-- (`fleetq:{q}:events`) and counters in the stats hash (`fleetq:{q}:stats`).

local function emit(K, kind, job_id, extra)
  local maxlen = config_num(K, 'events_maxlen', DEFAULT_EVENTS_MAXLEN)
  if maxlen <= 0 then return end
  local args = { 'XADD', K.events, 'MAXLEN', '~', maxlen, '*', 'type', kind, 'job', job_id }
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

local function stat(K, field, n)
  redis.call('HINCRBY', K.stats, field, n or 1)
end
