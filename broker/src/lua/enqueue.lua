-- fleetq_enqueue and fleetq_enqueue_batch: add jobs, idempotently when they have an `id`, and
-- answer their positions.
--
-- fleetq_enqueue (one job)
-- KEYS[1]  queue stream key, fleetq:{q}:stream
-- ARGV[1]  payload (JSON text; not parsed here: producers check it, workers dead-letter an
--          entry whose payload is not JSON)
-- ARGV[2…] optional field/value pairs: id, workflow, max_attempts, queue_timeout_ms,
--          start_timeout_ms, progress_timeout_ms, run_timeout_ms, traceparent, and
--          delay_ms (run no earlier than now + delay_ms; not stored on the entry)
-- Reply    { job_id, state, position, created }
--          state: 'waiting' or 'scheduled' (or the existing job's state when the id is known);
--          position: 1-based place among waiting jobs (0 when not waiting);
--          created: 1 when this call added the job, 0 when the id already existed.
--
-- fleetq_enqueue_batch (many jobs in one call, in order)
-- KEYS[1]  queue stream key
-- ARGV     per job: n (the number of optional field/value pairs, 0 to 9), the payload, then
--          the n pairs; at most BATCH_MAX jobs
-- Reply    per job { job_id, state, position, created }, as fleetq_enqueue's
--
-- Errors   'fleetq: …' when a payload is missing or too large, or a field is unknown or
--          not a whole number of its range (broker/src/limits.rs) where one is required;
--          when the queue config holds a bad value. Every job of a call is checked before
--          anything is written: a refused job (named by its place in the batch) refuses the
--          call.
--
-- Cost: the config (HGETALL) and the group's state (XINFO GROUPS, and XLEN when Redis cannot
-- tell the lag) are read once per call, whatever the number of jobs; per job, XADD of the
-- entry and of its `queued` event, plus HMGET and HSET for a job with an id and ZADD for one
-- with a queue timeout. Nothing reads the stream's entries, so the cost does not grow with the
-- payload beyond copying it once into the entry. TIME only for a scheduled job: a waiting
-- job's enqueue time is its entry id's.

local ENQUEUE_FIELDS = {
  id = 'string', workflow = 'string', traceparent = 'string',
  max_attempts = 'int', queue_timeout_ms = 'int', start_timeout_ms = 'int',
  progress_timeout_ms = 'int', run_timeout_ms = 'int', delay_ms = 'int',
}
local ENQUEUE_FIELDS_COUNT = 9
local DEFAULT_MAX_PAYLOAD_BYTES = 1048576
-- Most jobs in one fleetq_enqueue_batch call (a call holds Redis for its whole run).
local BATCH_MAX = 1000

-- What is wrong with a payload of `size` bytes for the queue, or nil.
local function over_limit(K, size)
  local limit = config_num(K, 'max_payload_bytes', DEFAULT_MAX_PAYLOAD_BYTES)
  if size <= limit then return nil end
  return 'payload is ' .. size .. ' bytes, over the queue limit of ' .. limit ..
    ' (config max_payload_bytes); store large inputs elsewhere and pass a reference'
end

-- One job's payload and optional pairs, args[from] to args[to]: checked into
-- { payload, fields (the entry's), id, delay }, or nil and what is wrong.
local function enqueue_job(K, args, from, to)
  local payload = args[from]
  if payload == nil or payload == '' then
    return nil, 'payload is missing; pass the job payload as a JSON text'
  end
  local too_large = over_limit(K, #payload)
  if too_large then return nil, too_large end
  if (to - from) % 2 ~= 0 then
    return nil, 'optional fields must come in field/value pairs'
  end
  local job = { fields = { 'payload', payload }, id = nil, delay = 0 }
  if to == from then return job end
  local given = {}
  for i = from + 1, to, 2 do
    local f, v = args[i], args[i + 1]
    local kind = ENQUEUE_FIELDS[f]
    if kind == nil then
      return nil, 'unknown field ' .. shown(f) .. '; see docs/protocol.md for the job fields'
    end
    if given[f] then
      return nil, 'field ' .. f .. ' is given twice; pass each field once'
    end
    given[f] = true
    local range = ENTRY_NUMBERS[f]
    if kind == 'int' and whole(v, range) == nil then
      return nil, 'field ' .. f .. ' must be a whole number from ' .. range[1] .. ' to ' ..
        range[2] .. ' (decimal digits only), got ' .. shown(v)
    end
    if kind == 'string' and (v == '' or #v > 200) then
      return nil, 'field ' .. f .. ' must be 1 to 200 bytes'
    end
    if f == 'id' then job.id = v end
    if f == 'delay_ms' then
      job.delay = tonumber(v)
    else
      job.fields[#job.fields + 1] = f
      job.fields[#job.fields + 1] = v
    end
  end
  return job
end

-- A scheduled job waits in the delayed set, its wait (and queue timeout) counting from its
-- due time; it needs an id to be found again.
local function schedule(K, job)
  local now = now_ms()
  local due = tostring(now + job.delay)
  local job_id, fields = job.id, job.fields
  if job_id == nil then
    job_id = 'j' .. now .. '-' .. redis.call('HINCRBY', K.stats, 'scheduled_seq', 1)
    fields[#fields + 1] = 'id'
    fields[#fields + 1] = job_id
  end
  fields[#fields + 1] = 'enqueued_ms'
  fields[#fields + 1] = due
  redis.call('HSET', job_key(K, job_id), 'state', 'scheduled', 'enqueued_ms', due,
    'due_ms', due, 'retry', cjson.encode(fields), 'attempts', '0')
  redis.call('ZADD', K.delayed, now + job.delay, job_id)
  stat(K, 'scheduled')
  emit(K, 'scheduled', job_id, { 'due_ms', due })
  return { job_id, 'scheduled', 0, 1 }
end

-- Adds checked jobs in order; `line()` gives the end of the line (read once per call).
local function add_jobs(K, jobs, line)
  local out = {}
  -- `queued` is a routine event (events.lua).
  local routine = config_num(K, 'routine_events', 0) == 1
  for _, job in ipairs(jobs) do
    local reply = nil
    if job.id ~= nil then
      local known = redis.call('HMGET', job_key(K, job.id), 'state', 'entry', 'seq')
      if known[1] then
        local pos = 0
        if known[1] == 'waiting' and known[2] then pos = position_of(K, known[2], known[3], line().group) end
        reply = { job.id, known[1], pos, 0 }
      end
    end
    if reply == nil and job.delay > 0 then reply = schedule(K, job) end
    if reply == nil then
      local entry_id, seq, pos = add_entry(K, job.fields, line())
      local job_id = job.id or entry_id
      if job.id ~= nil then
        local set = { 'HSET', job_key(K, job_id), 'state', 'waiting', 'entry', entry_id,
          'enqueued_ms', string.match(entry_id, '^(%d+)'), 'attempts', '0' }
        if seq ~= '' then
          set[#set + 1] = 'seq'
          set[#set + 1] = seq
        end
        redis.call(unpack(set))
      end
      if routine then emit(K, 'queued', job_id) end
      reply = { job_id, 'waiting', pos, 1 }
    end
    out[#out + 1] = reply
  end
  return out
end

-- The end of the line, read at the first add and shared by the adds that follow; the group
-- is made first when the queue has none (make_group), so that it counts from the start.
local function line_once(K)
  local L = nil
  return function()
    if L == nil then
      local g, exists = group_of(K)
      if g == nil then
        g = make_group(K, exists)
        exists = true
      end
      L = line_from(K, g, exists)
    end
    return L
  end
end

local function enqueue(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local job, wrong = enqueue_job(K, args, 1, #args)
  if job == nil then
    if args[1] == nil or args[1] == '' then wrong = wrong .. ' in ARGV[1]' end
    return redis.error_reply('fleetq: ' .. wrong)
  end
  return add_jobs(K, { job }, line_once(K))[1]
end

local function enqueue_batch(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local jobs = {}
  local i = 1
  while i <= #args do
    local n = whole(args[i], { 0, ENQUEUE_FIELDS_COUNT })
    local at = 'fleetq: fleetq_enqueue_batch: job ' .. (#jobs + 1) .. ' (ARGV[' .. i .. ']): '
    if n == nil then
      return redis.error_reply(at .. 'expected the number of its optional field/value pairs (0 to ' ..
        ENQUEUE_FIELDS_COUNT .. '), got ' .. shown(args[i]) .. '; pass per job: n, payload, n pairs')
    end
    if i + 1 + 2 * n > #args then
      return redis.error_reply(at .. 'announces ' .. n .. ' pairs but the call ends first; pass per job: n, payload, n pairs')
    end
    if #jobs == BATCH_MAX then
      return redis.error_reply('fleetq: fleetq_enqueue_batch takes at most ' .. BATCH_MAX ..
        ' jobs per call; split the batch')
    end
    local job, wrong = enqueue_job(K, args, i + 1, i + 1 + 2 * n)
    if job == nil then return redis.error_reply(at .. wrong) end
    jobs[#jobs + 1] = job
    i = i + 2 + 2 * n
  end
  return add_jobs(K, jobs, line_once(K))
end

-- fleetq_enqueue_check: before a producer adds large payloads of jobs without options with
-- plain XADDs (no function sees them: Redis 7.0's Lua would hash every byte), the checks
-- fleetq_enqueue would make of them.
-- KEYS[1]  queue stream key
-- ARGV[1]  the largest payload's size in bytes
-- Reply    'ok'; the error fleetq_enqueue gives for a payload over max_payload_bytes (or for a
--          bad queue config). Makes the group when the queue has none, as fleetq_enqueue
--          does, so that positions come from its counters from the first entry on.
local function enqueue_check(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local size = whole(args[1], { 0, ENTRY_NUMBERS.enqueued_ms[2] })
  if size == nil then
    return redis.error_reply('fleetq: fleetq_enqueue_check takes a payload size in bytes, got ' .. shown(args[1]))
  end
  local too_large = over_limit(K, size)
  if too_large then return redis.error_reply('fleetq: ' .. too_large) end
  local g, exists = group_of(K)
  if g == nil then make_group(K, exists) end
  return 'ok'
end

register('fleetq_enqueue', enqueue)
register('fleetq_enqueue_check', enqueue_check)
register('fleetq_enqueue_batch', enqueue_batch)
