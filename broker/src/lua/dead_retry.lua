-- fleetq_dead_retry and fleetq_dead_purge: an operator's hands on the dead letters.
--
-- fleetq_dead_retry — put a dead letter back in line as a fresh job (attempts reset).
-- KEYS[1]  queue stream key
-- ARGV[1]  dead-letter entry id (in fleetq:{q}:dead)
-- Reply    { job_id, new_entry_id }, or { '', '' } when there is no such dead letter.
--          The dead letter is removed; the job hash starts over (state waiting, attempts 0).
--
-- fleetq_dead_purge — delete dead letters.
-- KEYS[1]  queue stream key
-- ARGV…    dead-letter entry ids; none deletes every dead letter of the queue
-- Reply    how many were deleted.

local function dead_retry(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local r = redis.call('XRANGE', K.dead, args[1], args[1])
  if #r == 0 then return { '', '' } end
  local m = to_map(r[1][2])
  local fields = {}
  for f, v in pairs(m) do
    local name = string.match(f, '^f:(.+)$')
    if name and name ~= 'attempts' and name ~= 'avoid' and name ~= 'avoid_until' and name ~= 'passes'
      and name ~= 'seq' and name ~= 'enqueued_ms' then
      fields[#fields + 1] = name
      fields[#fields + 1] = v
    end
  end
  local job_id = m['job']
  if m['f:payload'] == nil then
    return redis.error_reply('fleetq: dead letter ' .. args[1] .. ' has no payload to run; purge it instead')
  end
  local live = redis.call('HGET', job_key(K, job_id), 'state')
  if live and not TERMINAL[live] then
    return redis.error_reply('fleetq: job ' .. job_id .. ' is live again (' .. live .. '); it cannot be retried from the dead letters twice')
  end
  local has_id = false
  for i = 1, #fields, 2 do if fields[i] == 'id' then has_id = true end end
  if not has_id then
    fields[#fields + 1] = 'id'
    fields[#fields + 1] = job_id
  end
  local new_id, seq = add_entry(K, fields)
  redis.call('XDEL', K.dead, args[1])
  local jk = job_key(K, job_id)
  redis.call('DEL', jk)
  redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', tostring(seq), 'attempts', '0',
    'enqueued_ms', tostring(now_ms()))
  stat(K, 'dead_retried')
  emit(K, 'queued', job_id, { 'from_dead', args[1] })
  return { job_id, new_id }
end

local function dead_purge(keys, args)
  local K = queue_keys(keys[1])
  if #args == 0 then
    local n = redis.call('XLEN', K.dead)
    redis.call('DEL', K.dead)
    return n
  end
  -- In slices: unpack of thousands of ids would overflow Lua's stack.
  local n = 0
  for i = 1, #args, 1000 do
    n = n + redis.call('XDEL', K.dead, unpack(args, i, math.min(i + 999, #args)))
  end
  return n
end

register('fleetq_dead_retry', dead_retry)
register('fleetq_dead_purge', dead_purge, DRAIN)
