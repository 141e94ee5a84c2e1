-- fleetq_progress: a running job reports that it started, or how far it got.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  entry id
-- ARGV[3]  token (the caller's, from its fleetq_take)
-- ARGV[4]  job id
-- ARGV[5]  kind: 'started' (the executor began the work) or 'progress'
-- ARGV[6]  progress JSON, e.g. {"step":3,"total":20,"stage":"KSampler","message":"…"}, or ''
-- ARGV[7]  stages JSON (the attempt's stage profile so far), or ''
-- Reply    'ok'; 'cancel' when a producer asked to cancel the job; 'lost' when the caller no
--          longer owns the entry (nothing is written).
--
-- Writes the job hash (`progress`, `stages`; for 'started' also state running,
-- attempt_started_ms, and the attempt counted in `attempts`) and a 'started' or 'progress'
-- event. Workers throttle their calls.

local function progress(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local consumer, entry_id, token, job_id, kind = args[1], args[2], args[3], args[4], args[5]
  local jk = job_key(K, job_id)
  if not owns(K, entry_id, consumer, token) then return 'lost' end
  local now = now_ms()
  local p, stages = args[6] or '', args[7] or ''
  if p ~= '' then redis.call('HSET', jk, 'progress', p, 'progress_ms', tostring(now)) end
  if stages ~= '' then redis.call('HSET', jk, 'stages', stages) end
  local h = redis.call('HMGET', jk, 'node', 'attempt', 'cancel')
  local node = h[1] or ''
  if kind == 'started' then
    redis.call('HSET', jk, 'state', 'running', 'attempt_started_ms', tostring(now))
    if h[2] then redis.call('HSET', jk, 'attempts', h[2]) end
    redis.call('HSETNX', jk, 'started_ms', tostring(now))
    emit(K, 'started', job_id, { 'node', node })
  else
    emit(K, 'progress', job_id, { 'node', node, 'progress', p })
  end
  if h[3] == '1' then return 'cancel' end
  return 'ok'
end

register('fleetq_progress', progress, DRAIN)
