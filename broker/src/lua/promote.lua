-- fleetq_promote: move due retries and scheduled jobs from the delayed set to the stream.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  most jobs to move in this call (default 100)
-- Reply    { moved, next_due_ms } — next_due_ms is the due time of the earliest job left in
--          the delayed set, or 0 when it is empty.
--
-- Idempotent: any number of brokers and workers may call it at any time; each job moves once
-- (ZREM happens in the same atomic step as the XADD).

local function promote_due(K, now, limit)
  local due = redis.call('ZRANGE', K.delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  for _, job_id in ipairs(due) do
    redis.call('ZREM', K.delayed, job_id)
    local jk = job_key(K, job_id)
    local saved = redis.call('HGET', jk, 'retry')
    if saved then
      local fields = cjson.decode(saved)
      local new_id, seq = add_entry(K, fields)
      stat(K, 'readded')
      redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', tostring(seq))
      redis.call('HDEL', jk, 'retry', 'due_ms')
      emit(K, 'queued', job_id, { 'promoted', '1' })
    end
  end
  local first = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
  local next_due = 0
  if #first > 0 then next_due = tonumber(first[2]) end
  return #due, next_due
end

local function promote(keys, args)
  local K = queue_keys(keys[1])
  local moved, next_due = promote_due(K, now_ms(), tonumber(args[1]) or 100)
  return { moved, next_due }
end

register('fleetq_promote', promote)
