-- fleetq_cancel: cancel a job.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  job id
-- Reply    { state } where state is:
--          'cancelled'   the job was waiting, scheduled or retrying and will not run;
--          'cancelling'  the job is running; its worker learns it at its next lease renewal,
--                        stops the job and records 'cancelled';
--          the job's terminal state when it had already ended (nothing changes);
--          'not_found'   no such job.
--
-- A waiting entry stays in the stream, marked by its job hash, and is dropped when a worker
-- reaches it: deleting entries that were never delivered would spoil the O(1) queue position.

local function cancel(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local job_id = args[1]
  local jk = job_key(K, job_id)
  local h = redis.call('HMGET', jk, 'state', 'entry')
  local state, entry = h[1], h[2]
  if TERMINAL[state] then return { state } end
  if not state then
    -- A plain-XADD job has no hash until a worker takes it; its id is its entry id.
    if not string.match(job_id, '^%d+%-%d+$') or entry_fields(K, job_id) == nil then
      return { 'not_found' }
    end
    entry = job_id
    state = 'waiting'
  end
  if state == 'scheduled' or state == 'retrying' then
    redis.call('ZREM', K.delayed, job_id)
    finish(K, job_id, 'cancelled')
    emit(K, 'cancelled', job_id)
    return { 'cancelled' }
  end
  if entry and pending_owner(K, entry) == nil and entry_fields(K, entry) ~= nil then
    -- Waiting: not yet delivered to any worker.
    redis.call('HSET', jk, 'entry', entry)
    finish(K, job_id, 'cancelled')
    -- The entry stays until a worker reaches it; count it so `waiting` can leave it out.
    redis.call('HSET', jk, 'tombstone', '1')
    mark_entry(K, entry)
    -- Kept until a worker drops the entry, or the entry would run once the hash expired.
    redis.call('PERSIST', jk)
    stat(K, 'tombstones')
    emit(K, 'cancelled', job_id)
    return { 'cancelled' }
  end
  redis.call('HSET', jk, 'cancel', '1')
  emit(K, 'cancelling', job_id)
  return { 'cancelling' }
end

register('fleetq_cancel', cancel, DRAIN)
