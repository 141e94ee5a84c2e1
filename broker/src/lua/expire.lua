-- fleetq_expire: end waiting jobs whose queue timeout passed, even when no worker is alive.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  most entries to look at in this call (default 1000)
-- Reply    { ended, scanned } — jobs ended here (expired, or dead-lettered: see below) and
--          waiting entries looked at
--
-- Looks at undelivered entries from where the previous call stopped (cursor `expire_cursor`
-- in the stats hash), wrapping to the oldest waiting entry at the end, so repeated calls cover
-- the whole backlog. A job expires when it never started (no `attempts` on the entry) and
-- enqueued_ms + its queue_timeout_ms (the entry's own, else the queue's) is past. The job
-- ends `expired` (waiters are woken); its entry stays in the stream, marked, until a worker
-- reaches and drops it: deleting entries that were never delivered would spoil the O(1)
-- queue position. Idempotent; any number of brokers may run it. Also dead-letters pending
-- entries idle past the lease that have no attempt left (their holder died on the last one,
-- and no worker needs to reclaim them to find out), removes consumers idle
-- for 10 minutes with nothing pending (hosts gone for good), forgets nodes not seen for a day,
-- and workflow blocks and suspensions that are over.

-- Entries whose holder's lease ran out and that have no attempt left: dead-letter them here,
-- so they do not wait for a worker with a free slot to reclaim them first. An attempt counts
-- once started, so an entry that never started on its last delivery is left for a reclaim.
local function dead_letter_lapsed(K, now)
  local lease = config_num(K, 'lease_ms', DEFAULT_LEASE_MS)
  if not may_judge(K, lease, now) then return 0 end
  local max_default = math.max(config_num(K, 'max_attempts', 3), 1)
  local ended = 0
  local due = redis.call('ZRANGE', K.leases, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
  for _, entry_id in ipairs(due) do
    local owner, _, idle = pending_owner(K, entry_id)
    local fields = owner and idle >= lease and entry_fields(K, entry_id)
    if fields then
      local job_id = job_id_of(entry_id, fields)
      local h = redis.call('HMGET', job_key(K, job_id), 'entry', 'attempts', 'max_attempts', 'nodes')
      local used = tonumber(h[2]) or 0
      local max = tonumber(h[3]) or entry_num(to_map(fields), 'max_attempts', max_default)
      if h[1] == entry_id and max and used >= max then
        blame_lease(K, entry_id, owner, now)
        end_exhausted(K, job_id, entry_id, fields, used, max, h[4] or '')
        ended = ended + 1
      end
    end
  end
  return ended
end

local function expire(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local limit = whole(args[1], { 1, 100000 }) or 1000
  local g = group_state(K)
  if g == nil then return { 0, 0 } end
  local last = g['last-delivered-id']
  local cursor = redis.call('HGET', K.stats, 'expire_cursor')
  if not cursor or not id_lt(last, cursor) then cursor = last end
  local default = config_num(K, 'queue_timeout_ms', 0)
  local now = now_ms()
  local r = redis.call('XRANGE', K.stream, '(' .. cursor, '+', 'COUNT', limit)
  local expired = 0
  for _, e in ipairs(r) do
    local m = to_map(e[2])
    local timeout = entry_num(m, 'queue_timeout_ms', default)
    local enqueued = entry_num(m, 'enqueued_ms', tonumber(string.match(e[1], '^(%d+)')))
    -- An entry with a bad number is the worker's to dead-letter (malformed), not this step's
    -- to expire.
    if timeout and enqueued and entry_num(m, 'attempts', 0) == 0 and timeout > 0 and enqueued + timeout < now then
      local job_id = job_id_of(e[1], e[2])
      local jk = job_key(K, job_id)
      local h = redis.call('HMGET', jk, 'state', 'started_ms', 'entry')
      -- Not a job that already started, nor an older duplicate of a job with the same id.
      if not TERMINAL[h[1]] and not h[2] and (not h[3] or h[3] == e[1]) then
        redis.call('HSET', jk, 'entry', e[1])
        end_expired(K, job_id, enqueued, timeout)
        -- The entry stays until a worker reaches it (see fleetq_cancel): keep the hash till then.
        redis.call('HSET', jk, 'tombstone', '1')
        mark_entry(K, e[1])
        redis.call('PERSIST', jk)
        stat(K, 'tombstones')
        expired = expired + 1
      end
    end
  end
  expired = expired + dead_letter_lapsed(K, now)
  -- Remove consumers of hosts gone for good: idle for 10 minutes with nothing pending (a live
  -- worker reads at least every max_block; one with pending entries keeps them reclaimable).
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', K.stream, GROUP)
  if ok then
    for _, c in ipairs(consumers) do
      local m = to_map(c)
      if tonumber(m['pending']) == 0 and (tonumber(m['idle']) or 0) > 600000 then
        redis.call('XGROUP', 'DELCONSUMER', K.stream, GROUP, m['name'])
        stat(K, 'consumers_removed')
      end
    end
  end
  -- Forget nodes not seen for a day, and blocks and suspensions that are over.
  redis.call('ZREMRANGEBYSCORE', K.nodes, '-inf', now - 86400000)
  for _, key in ipairs({ K.blocks, K.suspended }) do
    local flat = redis.call('HGETALL', key)
    for i = 1, #flat, 2 do
      if (tonumber(flat[i + 1]) or 0) <= now then redis.call('HDEL', key, flat[i]) end
    end
  end
  if #r < limit then
    redis.call('HDEL', K.stats, 'expire_cursor')
  else
    redis.call('HSET', K.stats, 'expire_cursor', r[#r][1])
  end
  return { expired, #r }
end

register('fleetq_expire', expire, DRAIN)
