-- requeue.lua: entries into and out of the stream — add (stamped with `seq`), drop (ack, delete,
-- forget the lease), back in line (at once or through the delayed set), to the dead letters,
-- and the two endings shared by several functions: expired before start, attempts exhausted.

-- Most fields of an entry copied to its dead letter; an entry with more (hostile input) keeps
-- the first ones and says how many were left out.
local DEAD_FIELDS_MAX = 64
-- Most fields an entry put back in line may carry: the ENTRY_FIELDS_MAX a valid job may have,
-- and room for those fleetq adds (id, enqueued_ms, attempts, avoid, avoid_until, passes, seq).
local ENTRY_ADD_MAX = ENTRY_FIELDS_MAX + 8

-- The deadline index (`fleetq:{q}:deadlines`): one member per entry of a job that has a
-- queue timeout and has not started, scored by its deadline (enqueued_ms + timeout), so that
-- fleetq_expire finds due jobs without reading the backlog. A member names the entry, the
-- enqueue time the timeout counts from, and the job: '<entry id> <enqueued_ms> <job id>'.
-- Members of entries that were taken meanwhile are dropped when their deadline comes
-- (fleetq_expire), not when the entry is taken.
local function deadline_member(entry_id, enqueued, job_id)
  return entry_id .. ' ' .. enqueued .. ' ' .. job_id
end

-- Indexes entry `entry_id` (fields `m`, a map) by its deadline when its job has a queue
-- timeout (its own queue_timeout_ms, else the config's) and no attempt counted. An entry
-- with a bad number is the worker's to dead-letter (malformed), so it is not indexed.
local function index_deadline(K, entry_id, flat, m)
  local timeout = entry_num(m, 'queue_timeout_ms', config_num(K, 'queue_timeout_ms', 0))
  if not timeout or timeout == 0 or entry_num(m, 'attempts', 0) ~= 0 then return end
  local enqueued = entry_num(m, 'enqueued_ms', tonumber(string.match(entry_id, '^(%d+)')))
  if not enqueued then return end
  redis.call('ZADD', K.deadlines, enqueued + timeout, deadline_member(entry_id, enqueued, job_id_of(entry_id, flat)))
end

-- Add an entry to the stream. When Redis can tell the stream's entries-added counter
-- (position.lua), the entry is stamped with `seq`, the value it gets, so that its queue
-- position is O(1) to compute; a `seq` among `flat` is never copied. A job with a queue
-- timeout is indexed by its deadline. `line` is the end of the line as line_of reads it,
-- shared by the adds of one call (read here when nil) and moved on by this add.
-- Returns the new entry id, its seq ('' when not stamped) and its 1-based position.
-- Callers check the field count first (the error below is a last guard, before anything is
-- written).
local function add_entry(K, flat, line)
  if #flat > 2 * ENTRY_ADD_MAX then
    return error('fleetq: an entry of ' .. (#flat / 2) .. ' fields cannot be added; at most ' .. ENTRY_ADD_MAX)
  end
  line = line or line_of(K)
  if #flat == 2 and flat[1] == 'payload' then
    -- A job of a payload alone (the common case): added without copying its fields.
    local id, seq
    if line.added then
      line.added = line.added + 1
      seq = tostring(line.added)
      id = redis.call('XADD', K.stream, '*', 'payload', flat[2], 'seq', seq)
    else
      seq = ''
      id = redis.call('XADD', K.stream, '*', 'payload', flat[2])
    end
    line.behind = line.behind + 1
    if config_num(K, 'queue_timeout_ms', 0) > 0 then index_deadline(K, id, flat, {}) end
    return id, seq, line.behind
  end
  local args = { 'XADD', K.stream, '*' }
  for i = 1, #flat, 2 do
    if flat[i] ~= 'seq' then
      args[#args + 1] = flat[i]
      args[#args + 1] = flat[i + 1]
    end
  end
  local seq = ''
  if line.added then
    line.added = line.added + 1
    seq = tostring(line.added)
    args[#args + 1] = 'seq'
    args[#args + 1] = seq
  end
  local id = redis.call(unpack(args))
  line.behind = line.behind + 1
  index_deadline(K, id, flat, to_map(flat))
  return id, seq, line.behind
end

-- Acknowledges and deletes delivered entries (a list of ids) in one step: XACKDEL where the
-- server has it (Redis 8.2), else XACK and XDEL.
local function has_xackdel()
  return (tonumber(redis.REDIS_VERSION_NUM) or 0) >= 0x080200
end

local function ack_delete(K, ids)
  if has_xackdel() then
    redis.call('XACKDEL', K.stream, GROUP, 'IDS', #ids, unpack(ids))
  else
    redis.call('XACK', K.stream, GROUP, unpack(ids))
    redis.call('XDEL', K.stream, unpack(ids))
  end
end

-- Remove a delivered entry from the group and the stream (the entry is finished), with its
-- lease and its holder's token.
local function drop_entry(K, entry_id)
  ack_delete(K, { entry_id })
  redis.call('ZREM', K.leases, entry_id)
  redis.call('HDEL', K.holds, entry_id)
end

-- Copy an entry to the dead-letter stream with its reason (at most DEAD_FIELDS_MAX fields).
local function dead_letter(K, job_id, fields, reason, err, attempts, nodes)
  local args = { 'XADD', K.dead, '*', 'job', job_id, 'reason', reason, 'error', err or '',
    'attempts', tostring(attempts or 0), 'nodes', nodes or '', 'dead_ms', tostring(now_ms()) }
  fields = fields or {}
  local n = math.min(#fields, 2 * DEAD_FIELDS_MAX)
  for i = 1, n - 1, 2 do
    args[#args + 1] = 'f:' .. fields[i]
    args[#args + 1] = fields[i + 1]
  end
  if #fields > n then
    args[#args + 1] = 'fields_left_out'
    args[#args + 1] = tostring((#fields - n) / 2)
  end
  redis.call(unpack(args))
end

-- The fields a delivered entry's job goes back in line with: its own, with `set` applied
-- (a value '' removes the field), its id and first enqueue time made explicit.
local function requeue_fields(K, job_id, entry_id, set)
  local fields = entry_fields(K, entry_id) or {}
  local keep = {}
  local have_id, have_enq = false, false
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'id' then have_id = true end
    if f == 'enqueued_ms' then have_enq = true end
    if f ~= 'seq' and set[f] == nil then
      keep[#keep + 1] = f
      keep[#keep + 1] = fields[i + 1]
    end
  end
  if not have_id then
    keep[#keep + 1] = 'id'
    keep[#keep + 1] = job_id
  end
  if not have_enq then
    keep[#keep + 1] = 'enqueued_ms'
    keep[#keep + 1] = string.match(entry_id, '^(%d+)')
  end
  for f, v in pairs(set) do
    if v ~= '' then
      keep[#keep + 1] = f
      keep[#keep + 1] = v
    end
  end
  return keep
end

-- Put a delivered entry's job back in line as a new entry: at once (delay 0) or through the
-- delayed set. `set` holds fields to set on the new entry (attempts, avoid, …). The new entry
-- is written before the old one is acknowledged and deleted, so a failure leaves the old one.
-- An entry with more fields than an entry may carry (one no fleetq worker runs) is
-- dead-lettered instead, reason malformed: returns false then, true when it went back in line.
local function requeue(K, job_id, entry_id, set, delay, now)
  local keep = requeue_fields(K, job_id, entry_id, set)
  local jk = job_key(K, job_id)
  if #keep > 2 * ENTRY_ADD_MAX then
    local fields = entry_fields(K, entry_id) or {}
    local reason = 'entry has ' .. (#fields / 2) .. ' fields, more than the ' .. ENTRY_FIELDS_MAX ..
      ' a job may carry; put large or many inputs in the payload, or pass a reference to them'
    dead_letter(K, job_id, fields, 'malformed', reason, set.attempts or 0,
      redis.call('HGET', jk, 'nodes') or '')
    drop_entry(K, entry_id)
    finish(K, job_id, 'dead', { 'error', reason, 'reason', 'malformed' })
    emit(K, 'dead', job_id, { 'reason', 'malformed' })
    return false
  end
  if delay <= 0 then
    local new_id, seq = add_entry(K, keep)
    stat(K, 'readded')
    redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', tostring(seq))
    redis.call('HDEL', jk, 'consumer', 'due_ms', 'retry')
  else
    redis.call('HSET', jk, 'state', 'retrying', 'retry', cjson.encode(keep), 'due_ms', tostring(now + delay))
    redis.call('HDEL', jk, 'entry', 'consumer')
    redis.call('ZADD', K.delayed, now + delay, job_id)
  end
  drop_entry(K, entry_id)
  return true
end

-- The job ended or was replaced, but its entry was still delivered: drop it. `h` is the job
-- record's HMGET of state, entry, cancel, nodes, started_ms, tombstone.
local function drop_duplicate(K, jk, entry_id, h)
  drop_entry(K, entry_id)
  if h[6] == '1' and h[2] == entry_id then
    -- A cancelled or expired waiting entry, reached at last: its hash may expire now.
    stat(K, 'tombstones', -1)
    redis.call('HDEL', jk, 'tombstone')
    redis.call('PEXPIRE', jk, retention_ms(K))
  else
    stat(K, 'duplicates')
  end
end

-- End a job whose queue timeout passed before it started (`timeout_ms` after `enqueued`).
local function end_expired(K, job_id, enqueued, timeout_ms)
  local waited = now_ms() - enqueued
  finish(K, job_id, 'expired', { 'error', 'queue timeout: not started within ' .. timeout_ms ..
    ' ms (waited ' .. waited .. ' ms)', 'timeout', 'queue', 'enqueued_ms', tostring(enqueued) })
  stat(K, 'timeout:queue')
  emit(K, 'expired', job_id, { 'waited_ms', tostring(waited) })
end

-- Dead-letter a delivered entry whose job used all its attempts, the last holders having lost
-- their leases; the entry leaves the stream.
local function end_exhausted(K, job_id, entry_id, fields, used, max, nodes)
  local reason = 'attempts exhausted: ' .. used .. ' of ' .. max ..
    ' used; the last holder lost its lease (dead, frozen or partitioned host)'
  dead_letter(K, job_id, fields, 'attempts_exhausted', reason, used, nodes)
  drop_entry(K, entry_id)
  finish(K, job_id, 'dead', { 'error', reason, 'reason', 'attempts_exhausted', 'attempts', tostring(used) })
  emit(K, 'dead', job_id, { 'reason', 'attempts_exhausted' })
end

-- The holder of `entry_id` (consumer `owner`) lost its lease: when it had taken this very
-- delivery (the job hash names it), count a lease timeout against its node and record the
-- attempt. Returns the job id and the entry's fields (nil when the entry is gone).
local function blame_lease(K, entry_id, owner, now)
  local fields = entry_fields(K, entry_id)
  if fields == nil then return nil, nil end
  local job_id = job_id_of(entry_id, fields)
  local jk = job_key(K, job_id)
  local h = redis.call('HMGET', jk, 'node', 'attempt', 'attempt_started_ms', 'entry', 'consumer')
  if h[1] and h[4] == entry_id and h[5] == owner then
    stat(K, 'timeout:lease')
    stat(K, 'node:' .. h[1] .. ':timeout:lease')
    redis.call('HSET', jk, 'timeout', 'lease', 'timeout_node', h[1])
    redis.call('HDEL', jk, 'consumer')
    redis.call('HDEL', K.holds, entry_id)
    record_attempt(K, jk, { attempt = tonumber(h[2]), node = h[1], outcome = 'timeout', timeout = 'lease',
      started_ms = tonumber(h[3]), ended_ms = now })
    emit(K, 'timeout', job_id, { 'node', h[1], 'kind', 'lease' })
  end
  return job_id, fields
end
