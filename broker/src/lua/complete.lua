-- fleetq_complete: end attempts of jobs, each fenced by ownership — a batch in one call.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  node name of the caller
-- ARGV[3…] per entry, 12 values:
--          entry id;
--          token (the caller's, from its fleetq_take; '' only to release an entry the caller
--          read but never took, at shutdown);
--          job id;
--          outcome: succeeded | failed | retry | dead | cancelled | release;
--          data: the result JSON (succeeded) or the error message (failed, retry, dead);
--            '' for cancelled and release;
--          retry delay in ms (retry; '0' otherwise);
--          reason code (dead: attempts_exhausted, malformed, …; '' otherwise);
--          timeout kind that ended the attempt, or '' (start|progress|run);
--          stage the attempt was in when it ended, or '';
--          elapsed ms of the attempt;
--          stages of the attempt, JSON array of {name, start_ms, duration_ms}, or '';
--          the attempt's number (fleetq_take's reply; '0' for a release without a token)
-- Reply    per entry, in order: 'ok'; 'poison' when a retry was turned into a dead letter
--          because the job has now failed on poison_nodes distinct nodes (the node is not to
--          blame); 'fenced' when the caller no longer holds the entry (nothing is written for
--          it but the `fenced` counter). Entries are independent: one fenced entry does not
--          stop the others. Every entry is checked before anything is written.
--
-- Attempts: an attempt that ended (succeeded, failed, retry, dead, cancelled) counts, started or
-- not; a released one does not.
--
-- succeeded/failed/dead/cancelled end the job (its hash then expires after retention_ms);
-- retry puts the job in the delayed set (due now + delay; with delay 0 it is re-added to the
-- stream at once) with its attempts counted, avoiding
-- this node (and, for a job with a workflow, blocking this node for that workflow) for
-- failover_cooldown_ms; release gives an unfinished job back at once without counting the
-- attempt (shutdown).
--
-- Cost: a first attempt's success — the common case — is written without reading its job
-- record: per batch one HMGET of the holds hash (tokens and waiters), one XACK and one XDEL
-- (one XACKDEL on Redis 8.2), one ZREM, one HDEL and two HINCRBY; per job one HSET and one
-- PEXPIRE. Every other ending reads the record and takes the full path.

local COMPLETE_HEADER = 2
local COMPLETE_STRIDE = 12

local OUTCOMES = { succeeded = 1, failed = 1, retry = 1, dead = 1, cancelled = 1, release = 1 }

-- May the caller end this attempt? With its token: it holds the entry. Without one (a release
-- at shutdown of an entry read but never taken): it owns the entry in the pending list and
-- the job record does not name it as this entry's holder.
local function may_complete(K, consumer, entry_id, token, jk, outcome)
  if token ~= '' then return owns(K, entry_id, consumer, token) end
  if outcome ~= 'release' or pending_owner(K, entry_id) ~= consumer then return false end
  local h = redis.call('HMGET', jk, 'entry', 'consumer')
  return h[1] ~= entry_id or h[2] == false
end

-- The full path for one entry `c` (see complete_entry for its fields).
local function complete_one(K, consumer, c)
  local entry_id, token, job_id = c.entry_id, c.token, c.job_id
  local outcome, data = c.outcome, c.data
  local timeout_kind, stage = c.timeout, c.stage
  local elapsed = c.elapsed
  local stages = c.stages
  local reason_arg = c.reason
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
  if outcome == 'retry' or (outcome == 'dead' and reason_arg == 'attempts_exhausted') then
    local failed = split_csv(h[4])
    if node ~= '' and not contains(failed, node) then failed[#failed + 1] = node end
    redis.call('HSET', jk, 'failed_nodes', table.concat(failed, ','))
    local m_nodes = config_num(K, 'poison_nodes', DEFAULT_POISON_NODES)
    if m_nodes > 0 and #failed >= m_nodes then
      outcome = 'dead'
      reason_arg = 'poison'
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
    local watched = finish(K, job_id, 'succeeded', { 'result', data, unpack(counted) })
    stat(K, 'node:' .. node .. ':succeeded')
    emit(K, 'succeeded', job_id, { 'node', node }, watched)
  elseif outcome == 'failed' then
    drop_entry(K, entry_id)
    finish(K, job_id, 'failed', { 'error', data, unpack(counted) })
    stat(K, 'node:' .. node .. ':failed')
    emit(K, 'failed', job_id, { 'node', node, 'error', data })
  elseif outcome == 'dead' then
    local reason = reason_arg
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
    local delay = c.delay
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

-- One entry's 12 values from ARGV[i…], checked; nil and what is wrong when they are not.
local function complete_entry(args, i)
  local c = { entry_id = args[i], token = args[i + 1], job_id = args[i + 2], outcome = args[i + 3],
    data = args[i + 4], reason = args[i + 6], timeout = args[i + 7], stage = args[i + 8], stages = args[i + 10] }
  if not OUTCOMES[c.outcome] then
    return nil, 'unknown outcome ' .. shown(c.outcome) .. '; use succeeded, failed, retry, dead, cancelled or release'
  end
  c.delay = whole(args[i + 5], MS_RANGE)
  c.elapsed = whole(args[i + 9], MS_RANGE)
  c.attempt = whole(args[i + 11], { 0, 4294967295 })
  if c.delay == nil or c.elapsed == nil or c.attempt == nil then
    return nil, 'delay ' .. shown(args[i + 5]) .. ', elapsed ' .. shown(args[i + 9]) .. ' or attempt ' ..
      shown(args[i + 11]) .. ' of entry ' .. shown(c.entry_id) .. ' is not a whole number of its range'
  end
  return c
end

-- Records the first-attempt successes `fast` ({ c, waiters } each, tokens already checked)
-- of the caller's node `node`, with one write of each kind for the batch.
local function finish_succeeded(K, node, fast)
  local now, retention = tostring(now_ms()), tostring(retention_ms(K))
  -- The `succeeded` event is routine: written when the queue asks for routine events, or for
  -- a job someone waits on.
  local routine = config_num(K, 'routine_events', 0) == 1
  local ids, holds = {}, {}
  for _, f in ipairs(fast) do
    local c, waiters = f[1], f[2]
    local jk = job_key(K, c.job_id)
    if c.stages ~= '' then
      redis.call('HSET', jk, 'state', 'succeeded', 'ended_ms', now, 'result', c.data, 'attempts', '1', 'stages', c.stages)
    else
      redis.call('HSET', jk, 'state', 'succeeded', 'ended_ms', now, 'result', c.data, 'attempts', '1')
    end
    redis.call('PEXPIRE', jk, retention)
    if waiters > 0 then
      wake_waiters(K, c.job_id, 'succeeded', waiters)
      holds[#holds + 1] = 'w:' .. c.job_id
    end
    if routine or waiters > 0 then emit(K, 'succeeded', c.job_id, { 'node', node }, waiters > 0) end
    ids[#ids + 1] = c.entry_id
    holds[#holds + 1] = c.entry_id
  end
  ack_delete(K, ids)
  redis.call('ZREM', K.leases, unpack(ids))
  redis.call('HDEL', K.holds, unpack(holds))
  stat(K, 'succeeded', #fast)
  stat(K, 'node:' .. node .. ':succeeded', #fast)
end

-- Ends the checked `entries` (complete_entry's tables) of the caller: each fenced on its own,
-- first-attempt successes written together (finish_succeeded), the rest one by one.
-- The fields of the holds hash complete_batch reads for `entries`, appended to `wanted`: each
-- entry's token and the number of callers waiting on its job.
local function holds_wanted(entries, wanted)
  for _, c in ipairs(entries) do
    wanted[#wanted + 1] = c.entry_id
    wanted[#wanted + 1] = 'w:' .. c.job_id
  end
  return wanted
end

-- `h`: the holds hash's values of holds_wanted(entries), when the caller read them already.
local function complete_batch(K, consumer, node, entries, h)
  if #entries == 0 then return {} end
  -- One read for the batch.
  h = h or redis.call('HMGET', K.holds, unpack(holds_wanted(entries, {})))
  local out, fast, fenced = {}, {}, 0
  for i, c in ipairs(entries) do
    local held, waiters = h[2 * i - 1], tonumber(h[2 * i]) or 0
    if c.token ~= '' and held ~= hold_value(c.token, consumer) then
      fenced = fenced + 1
      out[i] = 'fenced'
    elseif c.token ~= '' and c.outcome == 'succeeded' and c.attempt == 1 and c.timeout == '' then
      fast[#fast + 1] = { c, waiters }
      out[i] = 'ok'
    else
      out[i] = complete_one(K, consumer, c)
    end
  end
  if #fast > 0 then finish_succeeded(K, node, fast) end
  if fenced > 0 then stat(K, 'fenced', fenced) end
  return out
end

local function complete(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  if #args < COMPLETE_HEADER or (#args - COMPLETE_HEADER) % COMPLETE_STRIDE ~= 0 then
    return redis.error_reply('fleetq: fleetq_complete takes ' .. COMPLETE_HEADER .. ' values and then ' ..
      COMPLETE_STRIDE .. ' per entry; got ' .. #args .. ' (a worker of another protocol version?)')
  end
  local entries = {}
  for i = COMPLETE_HEADER + 1, #args, COMPLETE_STRIDE do
    local c, wrong = complete_entry(args, i)
    if c == nil then return redis.error_reply('fleetq: fleetq_complete: ' .. wrong) end
    entries[#entries + 1] = c
  end
  return complete_batch(K, args[1], args[2], entries)
end

-- fleetq_complete_first: fleetq_complete for first-attempt successes without a timeout, in
-- 4 values per entry instead of 12 (the common case of a busy queue).
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  node name of the caller
-- ARGV[3…] per entry, 4 values: entry id, token, job id, result JSON
-- Reply    per entry, in order: 'ok' or 'fenced', as fleetq_complete's
--
-- An end may be sent so only when fleetq_take answered `run` with attempt 1 for it, it
-- succeeded, no timeout ended it and it has no stage profile; anything else goes through
-- fleetq_complete. Written as fleetq_complete writes a first attempt's success.
local FIRST_HEADER = 2

-- The first-attempt successes in ARGV[from…to], 4 values each, as complete_batch's entries.
local function first_entries(args, from, to)
  local entries = {}
  for i = from, to, 4 do
    entries[#entries + 1] = { entry_id = args[i], token = args[i + 1], job_id = args[i + 2],
      outcome = 'succeeded', data = args[i + 3], attempt = 1, timeout = '', stages = '' }
  end
  return entries
end

local function complete_first(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  if #args < FIRST_HEADER or (#args - FIRST_HEADER) % 4 ~= 0 then
    return redis.error_reply('fleetq: fleetq_complete_first takes ' .. FIRST_HEADER ..
      ' values and then 4 per entry; got ' .. #args .. ' (a worker of another protocol version?)')
  end
  return complete_batch(K, args[1], args[2], first_entries(args, FIRST_HEADER + 1, #args))
end

register('fleetq_complete', complete, DRAIN)
register('fleetq_complete_first', complete_first, DRAIN)
