-- fleetq_enqueue: add a job, idempotently when it has an `id`, and answer its position.
--
-- KEYS[1]  queue stream key, fleetq:{q}:stream
-- ARGV[1]  payload (JSON text)
-- ARGV[2…] optional field/value pairs: id, workflow, max_attempts, queue_timeout_ms,
--          start_timeout_ms, progress_timeout_ms, run_timeout_ms, traceparent, and
--          delay_ms (run no earlier than now + delay_ms; not stored on the entry)
-- Reply    { job_id, state, position, created }
--          state: 'waiting' or 'scheduled' (or the existing job's state when the id is known);
--          position: 1-based place among waiting jobs (0 when not waiting);
--          created: 1 when this call added the job, 0 when the id already existed.
-- Errors   'fleetq: …' when the payload is not JSON, too large, or a field is unknown or
--          not a whole number of its range (broker/src/limits.rs) where one is required;
--          when the queue config holds a bad value (nothing is written then).

local ENQUEUE_FIELDS = {
  id = 'string', workflow = 'string', traceparent = 'string',
  max_attempts = 'int', queue_timeout_ms = 'int', start_timeout_ms = 'int',
  progress_timeout_ms = 'int', run_timeout_ms = 'int', delay_ms = 'int',
}
local DEFAULT_MAX_PAYLOAD_BYTES = 1048576

local function enqueue(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local payload = args[1]
  if payload == nil or payload == '' then
    return redis.error_reply('fleetq: payload is missing; pass the job payload as a JSON text in ARGV[1]')
  end
  local limit = config_num(K, 'max_payload_bytes', DEFAULT_MAX_PAYLOAD_BYTES)
  if #payload > limit then
    return redis.error_reply('fleetq: payload is ' .. #payload .. ' bytes, over the queue limit of ' .. limit ..
      ' (config max_payload_bytes); store large inputs elsewhere and pass a reference')
  end
  if not pcall(cjson.decode, payload) then
    return redis.error_reply('fleetq: payload is not valid JSON; send a JSON text such as {"prompt":"…"}')
  end
  if (#args - 1) % 2 ~= 0 then
    return redis.error_reply('fleetq: optional fields must come in field/value pairs')
  end
  local fields = { 'payload', payload }
  local job_id, delay = nil, 0
  local given = {}
  for i = 2, #args, 2 do
    local f, v = args[i], args[i + 1]
    local kind = ENQUEUE_FIELDS[f]
    if kind == nil then
      return redis.error_reply('fleetq: unknown field ' .. shown(f) .. '; see docs/protocol.md for the job fields')
    end
    if given[f] then
      return redis.error_reply('fleetq: field ' .. f .. ' is given twice; pass each field once')
    end
    given[f] = true
    local range = ENTRY_NUMBERS[f]
    if kind == 'int' and whole(v, range) == nil then
      return redis.error_reply('fleetq: field ' .. f .. ' must be a whole number from ' .. range[1] .. ' to ' ..
        range[2] .. ' (decimal digits only), got ' .. shown(v))
    end
    if kind == 'string' and (v == '' or #v > 200) then
      return redis.error_reply('fleetq: field ' .. f .. ' must be 1 to 200 bytes')
    end
    if f == 'id' then job_id = v end
    if f == 'delay_ms' then
      delay = tonumber(v)
    else
      fields[#fields + 1] = f
      fields[#fields + 1] = v
    end
  end

  if job_id ~= nil then
    local jk = job_key(K, job_id)
    local known = redis.call('HMGET', jk, 'state', 'entry', 'seq')
    if known[1] then
      local pos = 0
      if known[1] == 'waiting' and known[2] then pos = position_of(K, known[2], known[3]) end
      return { job_id, known[1], pos, 0 }
    end
  end

  local now = now_ms()
  if delay > 0 then
    -- A scheduled job waits in the delayed set; it needs an id to be found again.
    if job_id == nil then
      job_id = 'j' .. now .. '-' .. redis.call('HINCRBY', K.stats, 'scheduled_seq', 1)
      fields[#fields + 1] = 'id'
      fields[#fields + 1] = job_id
    end
    -- A scheduled job's wait (and queue timeout) counts from its due time.
    fields[#fields + 1] = 'enqueued_ms'
    fields[#fields + 1] = tostring(now + delay)
    redis.call('HSET', job_key(K, job_id), 'state', 'scheduled', 'enqueued_ms', tostring(now + delay),
      'due_ms', tostring(now + delay), 'retry', cjson.encode(fields), 'attempts', '0')
    redis.call('ZADD', K.delayed, now + delay, job_id)
    stat(K, 'scheduled')
    emit(K, 'scheduled', job_id, { 'due_ms', tostring(now + delay) })
    return { job_id, 'scheduled', 0, 1 }
  end

  local entry_id, seq = add_entry(K, fields)
  if job_id == nil then
    job_id = entry_id
  else
    redis.call('HSET', job_key(K, job_id), 'state', 'waiting', 'entry', entry_id, 'seq', tostring(seq),
      'enqueued_ms', tostring(now), 'attempts', '0')
  end
  emit(K, 'queued', job_id)
  return { job_id, 'waiting', position_of(K, entry_id, seq), 1 }
end

register('fleetq_enqueue', enqueue)
