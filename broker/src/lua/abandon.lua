-- fleetq_abandon: put back in line the entries of a consumer whose process is gone.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name (one the caller saw connected before and sees no more: its process
--          died and its connections closed)
-- Reply    { requeued, dead } — entries put back in line at once, and entries whose job had
--          no attempt left (dead-lettered, reason attempts_exhausted).
--
-- Each entry counts as a lease timeout of its holder's node (as a reclaim would), then goes
-- back in line as a new entry, which wakes a blocked worker at once; the consumer is removed
-- when it holds nothing more. A wrong verdict (the process lives but lost its connections) is
-- safe: its renewals and commit are fenced, and it stops its run.

local ABANDON_BATCH = 100

local function abandon_entry(K, consumer, entry_id, now)
  local job_id, fields = blame_lease(K, entry_id, consumer, now)
  if job_id == nil then
    -- Deleted while pending: only its place in the pending list is left.
    redis.call('XACK', K.stream, GROUP, entry_id)
    redis.call('ZREM', K.leases, entry_id)
    return 0, 0
  end
  local m = to_map(fields)
  local h = redis.call('HMGET', job_key(K, job_id), 'entry', 'attempts', 'max_attempts', 'nodes', 'state')
  -- An entry whose counts are not numbers of their range (never taken: no fleetq worker runs
  -- it) goes back in line as it is; the worker that reads it next dead-letters it.
  local used, max = entry_num(m, 'attempts', 0), entry_num(m, 'max_attempts', math.max(config_num(K, 'max_attempts', 3), 1))
  if h[1] == entry_id then used = tonumber(h[2]) or used end
  max = tonumber(h[3]) or max
  if TERMINAL[h[5]] or (h[1] and h[1] ~= entry_id) then
    local jk = job_key(K, job_id)
    drop_duplicate(K, jk, entry_id, redis.call('HMGET', jk, 'state', 'entry', 'cancel', 'nodes', 'started_ms', 'tombstone'))
    return 0, 0
  end
  if used and max and used >= max then
    end_exhausted(K, job_id, entry_id, fields, used, max, h[4] or '')
    return 0, 1
  end
  if not requeue(K, job_id, entry_id, { attempts = used and tostring(used) or nil }, 0, now) then return 0, 1 end
  if used then redis.call('HSET', job_key(K, job_id), 'attempts', tostring(used)) end
  emit(K, 'released', job_id, { 'node', '', 'reason', 'process gone' })
  return 1, 0
end

local function abandon(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local consumer = args[1]
  local now = now_ms()
  local ok, pending = pcall(redis.call, 'XPENDING', K.stream, GROUP, '-', '+', ABANDON_BATCH, consumer)
  if not ok then return { 0, 0 } end
  local requeued, dead = 0, 0
  for _, p in ipairs(pending) do
    local r, d = abandon_entry(K, consumer, p[1], now)
    requeued, dead = requeued + r, dead + d
  end
  if #pending < ABANDON_BATCH then
    redis.call('XGROUP', 'DELCONSUMER', K.stream, GROUP, consumer)
  end
  if requeued + dead > 0 then stat(K, 'abandoned', requeued + dead) end
  return { requeued, dead }
end

register('fleetq_abandon', abandon, DRAIN)
