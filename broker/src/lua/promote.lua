-- fleetq_promote: move due retries and scheduled jobs from the delayed set to the stream.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  most jobs to move in this call (default 100)
-- Reply    { moved, next_due_ms } — next_due_ms is the due time of the earliest job left in
--          the delayed set, or 0 when it is empty.
--
-- Idempotent: any number of brokers and workers may call it at any time; each job moves once
-- (ZREM happens in the same atomic step as the XADD).

-- Puts one due job back in line. Its saved fields are checked before anything is removed: a
-- record that cannot be read (written by hand, say) is dead-lettered with the reason.
-- `line()` gives the end of the line, read once for all the jobs of one call.
local function promote_one(K, job_id, line)
  local jk = job_key(K, job_id)
  local saved = redis.call('HGET', jk, 'retry')
  local ok, fields = false, nil
  if saved then ok, fields = pcall(cjson.decode, saved) end
  redis.call('ZREM', K.delayed, job_id)
  if not saved then return end
  if not ok or type(fields) ~= 'table' or #fields > 2 * ENTRY_ADD_MAX then
    local reason = 'malformed: its saved retry fields are not a JSON array of at most ' .. ENTRY_ADD_MAX .. ' fields'
    dead_letter(K, job_id, {}, 'malformed', reason, 0, '')
    finish(K, job_id, 'dead', { 'error', reason, 'reason', 'malformed' })
    emit(K, 'dead', job_id, { 'reason', 'malformed' })
    return
  end
  for i = 1, #fields do fields[i] = tostring(fields[i]) end
  local new_id, seq = add_entry(K, fields, line())
  stat(K, 'readded')
  if seq ~= '' then
    redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', seq)
    redis.call('HDEL', jk, 'retry', 'due_ms')
  else
    redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id)
    redis.call('HDEL', jk, 'retry', 'due_ms', 'seq')
  end
  emit(K, 'queued', job_id, { 'promoted', '1' })
end

local function promote_due(K, now, limit)
  local due = redis.call('ZRANGE', K.delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  local L = nil
  local function line()
    if L == nil then L = line_of(K) end
    return L
  end
  for _, job_id in ipairs(due) do promote_one(K, job_id, line) end
  local first = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
  local next_due = 0
  if #first > 0 then next_due = tonumber(first[2]) end
  return #due, next_due
end

local function promote(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local moved, next_due = promote_due(K, now_ms(), whole(args[1], { 1, 100000 }) or 100)
  return { moved, next_due }
end

register('fleetq_promote', promote, DRAIN)
