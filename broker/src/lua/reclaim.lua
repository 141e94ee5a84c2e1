-- fleetq_reclaim: a worker with free slots takes over entries whose lease ran out.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  lease in ms: entries idle at least this long are reclaimed
-- ARGV[3]  most entries to claim (the caller's free slots)
-- ARGV[4]  node name of the caller (marks the node alive)
-- Reply    { entries, next_wake_ms, now_ms } — entries as XAUTOCLAIM gives them
--          ({ {id, {field, value, …}}, … }); the caller passes them to fleetq_take, which
--          counts the attempt (XAUTOCLAIM raised their delivery count).
--          next_wake_ms: the earliest time something may become due here (a lease deadline
--          or a delayed job), 0 when nothing is pending; a worker blocks until then at most.
--          now_ms: the server's clock, to turn next_wake_ms into a delay.
--
-- Promotes due delayed jobs first, so a fleet with no broker still retries. Walks the pending
-- list with the XAUTOCLAIM cursor (stored in the stats hash, so successive calls continue
-- where the last stopped) and drops lease records of entries that were deleted meanwhile.

local RECLAIM_MAX_STEPS = 20

local function reclaim(keys, args)
  local K = queue_keys(keys[1])
  local consumer, lease, want = args[1], tonumber(args[2]), tonumber(args[3])
  local now = now_ms()
  seen(K, args[4])
  local _, next_due = promote_due(K, now, 100)
  local claimed = {}
  if want > 0 and redis.call('EXISTS', K.stream) == 1 then
    local cursor = redis.call('HGET', K.stats, 'reclaim_cursor') or '0-0'
    -- Scan from where the last call stopped, wrapping to the start once.
    local wrapped = cursor == '0-0'
    for _ = 1, RECLAIM_MAX_STEPS do
      local ok, r = pcall(redis.call, 'XAUTOCLAIM', K.stream, GROUP, consumer, lease, cursor,
        'COUNT', want - #claimed)
      if not ok then break end
      cursor = r[1]
      for _, e in ipairs(r[2]) do
        claimed[#claimed + 1] = e
        redis.call('ZREM', K.leases, e[1])
        -- The holder's lease ran out: a lease timeout of its node.
        local job_id = job_id_of(e[1], e[2])
        local jk = job_key(K, job_id)
        local h = redis.call('HMGET', jk, 'node', 'attempts', 'attempt_started_ms', 'entry', 'deliveries')
        -- Blame the holder only when it had taken this very delivery (else the node field is
        -- an earlier attempt's and the holder died between its read and fleetq_take).
        local _, count = pending_owner(K, e[1])
        if h[1] and h[4] == e[1] and tonumber(h[5]) == count - 1 then
          stat(K, 'timeout:lease')
          stat(K, 'node:' .. h[1] .. ':timeout:lease')
          redis.call('HSET', jk, 'timeout', 'lease', 'timeout_node', h[1])
          record_attempt(K, jk, { attempt = tonumber(h[2]), node = h[1], outcome = 'timeout', timeout = 'lease',
            started_ms = tonumber(h[3]), ended_ms = now })
          emit(K, 'timeout', job_id, { 'node', h[1], 'kind', 'lease' })
        end
      end
      for _, gone in ipairs(r[3] or {}) do
        redis.call('ZREM', K.leases, gone)
      end
      if #claimed >= want then break end
      if cursor == '0-0' then
        if wrapped then break end
        wrapped = true
      end
    end
    redis.call('HSET', K.stats, 'reclaim_cursor', cursor)
    if #claimed > 0 then stat(K, 'reclaimed', #claimed) end
  end
  -- A lease record a whole lease past its deadline would have been claimed by now: its entry
  -- left the pending list without a fleetq step (XACK by hand, say). Forget it.
  redis.call('ZREMRANGEBYSCORE', K.leases, '-inf', now - lease)
  local next_wake = next_due
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  if #first > 0 then
    local d = tonumber(first[2])
    if d <= now then d = now + 100 end
    if next_wake == 0 or d < next_wake then next_wake = d end
  end
  return { claimed, next_wake, now }
end

register('fleetq_reclaim', reclaim)
