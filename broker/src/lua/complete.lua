-- fleetq_complete: end one attempt of a job, fenced by ownership — all or nothing.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  entry id
-- ARGV[3]  token (the caller's, from its fleetq_take; '' only to release an entry the caller
--          read but never took, at shutdown)
-- ARGV[4]  job id
-- ARGV[5]  outcome: succeeded | failed | retry | dead | cancelled | release
-- ARGV[6]  data: the result JSON (succeeded) or the error message (failed, retry, dead)
-- ARGV[7]  retry delay in ms (retry only)
-- ARGV[8]  reason code (dead only): attempts_exhausted, malformed, …
-- ARGV[9]  timeout kind that ended the attempt, or '' (start|progress|run)
-- ARGV[10] stage the attempt was in when it ended, or ''
-- ARGV[11] elapsed ms of the attempt
-- ARGV[12] stages of the attempt, JSON array of {name, start_ms, duration_ms}, or ''
-- Reply    'ok'; 'poison' when a retry was turned into a dead letter because the job has now
--          failed on poison_nodes distinct nodes (the node is not to blame); 'fenced' when the
--          caller no longer owns the entry (nothing is written but the `fenced` counter).
--
-- Attempts: an attempt that ended (succeeded, failed, retry, dead, cancelled) counts, started or
-- not; a released one does not.
--
-- succeeded/failed/dead/cancelled end the job (its hash then expires after retention_ms);
-- retry puts the job in the delayed set (due now + delay) with its attempts counted, avoiding
-- this node (and, for a job with a workflow, blocking this node for that workflow) for
-- failover_cooldown_ms; release gives an unfinished job back at once without counting the
-- attempt (shutdown).

local OUTCOMES = { succeeded = 1, failed = 1, retry = 1, dead = 1, cancelled = 1, release = 1 }

-- May the caller end this attempt? With its token: it holds the entry. Without one (a release
-- at shutdown of an entry read but never taken): it owns the entry in the pending list and
-- the job record does not name it as this entry's holder.
local function may_complete(K, consumer, entry_id, token, jk, outcome)
  if token ~= '' then return owns(K, entry_id, consumer, token, jk) end
  if outcome ~= 'release' or pending_owner(K, entry_id) ~= consumer then return false end
  local h = redis.call('HMGET', jk, 'entry', 'consumer')
  return h[1] ~= entry_id or h[2] == false
end

local function complete(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local consumer, entry_id, token, job_id = args[1], args[2], args[3] or '', args[4]
  local outcome, data = args[5], args[6] or ''
  local timeout_kind, stage = args[9] or '', args[10] or ''
  local elapsed = whole(args[11], MS_RANGE) or 0
  local stages = args[12] or ''
  if not OUTCOMES[outcome] then
    return redis.error_reply('fleetq: unknown outcome "' .. outcome .. '"; use succeeded, failed, retry, dead, cancelled or release')
  end
  local jk = job_key(K, job_id)
  if not may_complete(K, consumer, entry_id, token, jk, outcome) then
    stat(K, 'fenced')
    return 'fenced'
  end
  if token == '' then
    -- A release of an entry never taken: an entry of an ended or replaced job only leaves.
    local d = redis.call('HMGET', jk, 'state', 'entry', 'cancel', 'nodes', 'started_ms', 'tombstone')
    if TERMINAL[d[1]] or (d[2] and d[2] ~= entry_id) then
      drop_duplicate(K, jk, entry_id, d)
      return 'ok'
    end
  end
  local now = now_ms()
  local h = redis.call('HMGET', jk, 'attempt', 'nodes', 'node', 'failed_nodes', 'entry', 'attempt_started_ms')
  local attempts, nodes, node = h[1] or '0', h[2] or '', h[3] or ''
  if h[5] ~= entry_id then attempts, node = '0', '' end
  -- An attempt that ended counts (started or not): written with the end itself below.
  local counted = {}
  if h[5] == entry_id then counted = { 'attempts', attempts } end
  -- The entry's own fields are needed only to dead-letter or re-add it.
  local fields, m = {}, {}
  if outcome ~= 'succeeded' and outcome ~= 'failed' and outcome ~= 'cancelled' then
    fields = entry_fields(K, entry_id) or {}
    m = to_map(fields)
  end
  local reply = 'ok'

  if timeout_kind ~= '' then
    stat(K, 'timeout:' .. timeout_kind)
    stat(K, 'node:' .. node .. ':timeout:' .. timeout_kind)
    redis.call('HSET', jk, 'timeout', timeout_kind, 'timeout_stage', stage, 'timeout_elapsed_ms', tostring(elapsed),
      'timeout_node', node)
  end
  if stages ~= '' then redis.call('HSET', jk, 'stages', stages) end

  -- A retry (or the last attempt's failure) of a job that has now failed on poison_nodes
  -- distinct nodes is poison: the job is to blame, not the node.
  if outcome == 'retry' or (outcome == 'dead' and args[8] == 'attempts_exhausted') then
    local failed = split_csv(h[4])
    if node ~= '' and not contains(failed, node) then failed[#failed + 1] = node end
    redis.call('HSET', jk, 'failed_nodes', table.concat(failed, ','))
    local m_nodes = config_num(K, 'poison_nodes', DEFAULT_POISON_NODES)
    if m_nodes > 0 and #failed >= m_nodes then
      outcome = 'dead'
      args[8] = 'poison'
      data = 'poison: failed on ' .. #failed .. ' distinct nodes (' .. table.concat(failed, ', ') .. '); last error: ' .. data
      reply = 'poison'
    end
  end

  local ended_as = outcome
  if outcome == 'retry' then ended_as = 'failed' end
  if timeout_kind ~= '' then ended_as = 'timeout' end
  if outcome == 'release' then ended_as = 'released' end
  -- The attempt history: a job that succeeded at its first attempt needs none (its node,
  -- timestamps and state say it all), which keeps the common case cheap.
  if not (outcome == 'succeeded' and tonumber(attempts) == 1 and timeout_kind == '') then
    record_attempt(K, jk, { attempt = tonumber(attempts), node = node, outcome = ended_as, timeout = timeout_kind,
      stage = stage, started_ms = tonumber(h[6]), ended_ms = now, elapsed_ms = elapsed,
      error = (outcome ~= 'succeeded' and outcome ~= 'release') and string.sub(data, 1, 300) or nil })
  end

  if outcome == 'succeeded' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'succeeded', { 'result', data, unpack(counted) })
    stat(K, 'node:' .. node .. ':succeeded')
    emit(K, 'succeeded', job_id, { 'node', node })
  elseif outcome == 'failed' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'failed', { 'error', data, unpack(counted) })
    stat(K, 'node:' .. node .. ':failed')
    emit(K, 'failed', job_id, { 'node', node, 'error', data })
  elseif outcome == 'dead' then
    local reason = args[8] or ''
    if reason == '' then reason = 'failed' end
    dead_letter(K, job_id, fields, reason, data, attempts, nodes)
    drop_entry(K, entry_id)
    finish(K, job_id, 'dead', { 'error', data, 'reason', reason, unpack(counted) })
    if reason ~= 'malformed' then stat(K, 'node:' .. node .. ':failed') end
    emit(K, 'dead', job_id, { 'node', node, 'reason', reason, 'error', data })
  elseif outcome == 'cancelled' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'cancelled', counted)
    emit(K, 'cancelled', job_id, { 'node', node })
  elseif outcome == 'retry' or outcome == 'release' then
    -- Attempts made so far: this one counts unless it is released; an entry released before
    -- it was taken still carries its own count.
    local done
    if h[5] == entry_id and token == '' then
      -- Released without a token (never taken by the caller): the attempts counted stay.
      done = tonumber(redis.call('HGET', jk, 'attempts')) or 0
    elseif h[5] == entry_id then
      done = tonumber(attempts) or 0
      if outcome == 'release' then done = math.max(done - 1, 0) end
    else
      -- A bad count on the entry stays as it is: the worker that reads it next dead-letters it.
      done = entry_num(m, 'attempts', 0)
    end
    local set = { attempts = done and tostring(done) or nil }
    done = done or 0
    local delay = whole(args[7], MS_RANGE) or 0
    if outcome == 'retry' then
      local cooldown = config_num(K, 'failover_cooldown_ms', DEFAULT_FAILOVER_COOLDOWN_MS)
      local avoid = split_csv(m['avoid'])
      if node ~= '' and not contains(avoid, node) then avoid[#avoid + 1] = node end
      -- The most recent few are enough (and keep the field short).
      while #avoid > 8 do table.remove(avoid, 1) end
      set.avoid = table.concat(avoid, ',')
      set.avoid_until = tostring(now + cooldown)
      set.passes = ''
      local workflow = m['workflow']
      if workflow and workflow ~= '' and node ~= '' then
        redis.call('HSET', K.blocks, block_field(workflow, node), tostring(now + cooldown))
      end
    else
      delay = 0
    end
    if not requeue(K, job_id, entry_id, set, delay, now) then return reply end
    redis.call('HSET', jk, 'attempts', tostring(done))
    if outcome == 'retry' then
      redis.call('HSET', jk, 'error', data)
      stat(K, 'retried')
      stat(K, 'node:' .. node .. ':failed')
      emit(K, 'retrying', job_id, { 'node', node, 'error', data, 'delay_ms', tostring(delay), 'timeout', timeout_kind })
    else
      stat(K, 'released')
      emit(K, 'released', job_id, { 'node', node })
    end
  end
  if timeout_kind ~= '' then
    emit(K, 'timeout', job_id, { 'node', node, 'kind', timeout_kind, 'stage', stage, 'elapsed_ms', tostring(elapsed) })
  end
  return reply
end

register('fleetq_complete', complete, DRAIN)
