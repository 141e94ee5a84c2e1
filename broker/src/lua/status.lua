-- fleetq_status and fleetq_watch: what a producer may know about a job.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  job id
-- Reply    a flat field/value array: state plus whatever the job hash holds (attempts, node,
--          nodes, enqueued_ms, started_ms, ended_ms, progress, result, error, reason, …) and,
--          for a waiting job, position. state 'not_found' when the job is unknown (never
--          enqueued, or ended longer ago than retention_ms).
--
-- fleetq_watch does the same and registers the caller as a waiter first: when the job ends,
-- one token per waiter is pushed to fleetq:{q}:notify:<id>, so the caller can block on
-- BLPOP of that key instead of polling. Because the registration and the state read are one
-- atomic step, a job that ends in between is seen as ended here, never missed.

local STATUS_FIELDS = { 'state', 'attempts', 'max_attempts', 'node', 'nodes', 'enqueued_ms', 'taken_ms',
  'started_ms', 'ended_ms', 'due_ms', 'progress', 'result', 'error', 'reason', 'timeout', 'entry', 'seq', 'cancel',
  'timeout_stage', 'timeout_elapsed_ms', 'timeout_node', 'stages', 'history', 'attempt_started_ms', 'progress_ms' }

-- Read for the reply's sake but not shown: where the entry is, its sequence, the cancel flag.
local INTERNAL_FIELDS = { entry = true, seq = true, cancel = true }

local function read_status(K, job_id, watch)
  local jk = job_key(K, job_id)
  local h = redis.call('HMGET', jk, unpack(STATUS_FIELDS))
  local state = h[1]
  local entry, seq = h[16], h[17]
  if not state and string.match(job_id, '^%d+%-%d+$') then
    -- A plain-XADD job that no worker has taken yet: its id is its entry id.
    local fields = entry_fields(K, job_id)
    if fields then
      entry = job_id
      seq = to_map(fields)['seq']
      if pending_owner(K, job_id) == nil then state = 'waiting' else state = 'taken' end
    end
  end
  if not state then return { 'state', 'not_found' } end
  if h[18] == '1' and not TERMINAL[state] then state = 'cancelling' end
  local out = { 'state', state }
  for i = 2, #STATUS_FIELDS do
    if h[i] and not INTERNAL_FIELDS[STATUS_FIELDS[i]] then
      out[#out + 1] = STATUS_FIELDS[i]
      out[#out + 1] = h[i]
    end
  end
  if state == 'waiting' and entry then
    out[#out + 1] = 'position'
    out[#out + 1] = tostring(position_of(K, entry, seq))
  end
  if watch and not TERMINAL[state] then
    redis.call('HINCRBY', K.holds, 'w:' .. job_id, 1)
  end
  return out
end

local function status(keys, args)
  return read_status(queue_keys(keys[1]), args[1], false)
end

local function watch(keys, args)
  return read_status(queue_keys(keys[1]), args[1], true)
end

register('fleetq_status', status, { 'no-writes' })
register('fleetq_watch', watch, DRAIN)
