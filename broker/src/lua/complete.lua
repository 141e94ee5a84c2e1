-- fleetq_complete: end one attempt of a job, fenced by ownership — all or nothing.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  entry id
-- ARGV[3]  deliveries (as returned by fleetq_take: the fencing token)
-- ARGV[4]  job id
-- ARGV[5]  outcome: succeeded | failed | retry | dead | cancelled | release
-- ARGV[6]  data: the result JSON (succeeded) or the error message (failed, retry, dead)
-- ARGV[7]  retry delay in ms (retry only)
-- ARGV[8]  reason code (dead only): e.g. attempts_exhausted, malformed, poison
-- ARGV[9]  optional timeout kind that ended the attempt (queue|start|progress|run|lease)
-- Reply    'ok', or 'fenced' when the caller no longer owns the entry (nothing is written
--          except the `fenced` counter).
--
-- succeeded/failed/dead/cancelled end the job (its hash then expires after retention_ms);
-- retry puts the job in the delayed set (due now + delay) with its attempts counted;
-- release gives an unfinished job back at once without counting the attempt (shutdown).

local function complete(keys, args)
  local K = queue_keys(keys[1])
  local consumer, entry_id, deliveries, job_id = args[1], args[2], args[3], args[4]
  local outcome, data = args[5], args[6] or ''
  local timeout_kind = args[9] or ''
  if not owns(K, entry_id, consumer, deliveries) then
    stat(K, 'fenced')
    return 'fenced'
  end
  local jk = job_key(K, job_id)
  local now = now_ms()
  local h = redis.call('HMGET', jk, 'attempts', 'nodes', 'node', 'started_ms', 'entry')
  local attempts, nodes, node = h[1] or '0', h[2] or '', h[3] or ''
  if timeout_kind ~= '' then
    stat(K, 'timeout:' .. timeout_kind)
    stat(K, 'node:' .. node .. ':timeout:' .. timeout_kind)
  end

  if outcome == 'succeeded' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'succeeded', { 'result', data })
    stat(K, 'node:' .. node .. ':succeeded')
    emit(K, 'succeeded', job_id, { 'node', node })
  elseif outcome == 'failed' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'failed', { 'error', data })
    stat(K, 'node:' .. node .. ':failed')
    emit(K, 'failed', job_id, { 'node', node, 'error', data })
  elseif outcome == 'dead' then
    local reason = args[8] or 'failed'
    local fields = entry_fields(K, entry_id)
    dead_letter(K, job_id, fields, reason, data, attempts, nodes)
    drop_entry(K, entry_id)
    finish(K, job_id, 'dead', { 'error', data, 'reason', reason })
    stat(K, 'node:' .. node .. ':failed')
    emit(K, 'dead', job_id, { 'node', node, 'reason', reason, 'error', data })
  elseif outcome == 'cancelled' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'cancelled')
    emit(K, 'cancelled', job_id, { 'node', node })
  elseif outcome == 'retry' or outcome == 'release' then
    local fields = entry_fields(K, entry_id) or {}
    local m = to_map(fields)
    local keep = {}
    for i = 1, #fields, 2 do
      local f = fields[i]
      if f ~= 'attempts' and f ~= 'avoid' and f ~= 'seq' and f ~= 'enqueued_ms' then
        keep[#keep + 1] = f
        keep[#keep + 1] = fields[i + 1]
      end
    end
    if m['id'] == nil then
      keep[#keep + 1] = 'id'
      keep[#keep + 1] = job_id
    end
    keep[#keep + 1] = 'enqueued_ms'
    keep[#keep + 1] = m['enqueued_ms'] or string.match(entry_id, '^(%d+)')
    local avoid = m['avoid'] or ''
    -- Attempts made so far: counted by fleetq_take when this entry was taken; an entry
    -- released before it was taken still carries its own count.
    local done
    if h[5] == entry_id then
      done = tonumber(attempts) or 0
      if outcome == 'release' then done = math.max(done - 1, 0) end
    else
      done = tonumber(m['attempts']) or 0
    end
    if outcome == 'retry' and node ~= '' then
      if avoid ~= '' then avoid = avoid .. ',' end
      avoid = avoid .. node
    end
    keep[#keep + 1] = 'attempts'
    keep[#keep + 1] = tostring(done)
    if avoid ~= '' then
      keep[#keep + 1] = 'avoid'
      keep[#keep + 1] = avoid
    end
    drop_entry(K, entry_id)
    local delay = tonumber(args[7]) or 0
    if outcome == 'release' or delay <= 0 then
      local new_id, seq = add_entry(K, keep)
      redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', tostring(seq), 'attempts', tostring(done))
      redis.call('HDEL', jk, 'consumer', 'due_ms')
    else
      redis.call('HSET', jk, 'state', 'retrying', 'retry', cjson.encode(keep), 'due_ms', tostring(now + delay),
        'attempts', tostring(done))
      redis.call('HDEL', jk, 'entry', 'consumer')
      redis.call('ZADD', K.delayed, now + delay, job_id)
    end
    if outcome == 'retry' then
      redis.call('HSET', jk, 'error', data)
      stat(K, 'retried')
      stat(K, 'node:' .. node .. ':failed')
      emit(K, 'retrying', job_id, { 'node', node, 'error', data, 'delay_ms', tostring(delay) })
    else
      stat(K, 'released')
      emit(K, 'released', job_id, { 'node', node })
    end
  else
    return redis.error_reply('fleetq: unknown outcome "' .. outcome .. '"; use succeeded, failed, retry, dead, cancelled or release')
  end
  return 'ok'
end

redis.register_function('fleetq_complete', complete)
