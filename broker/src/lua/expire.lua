-- fleetq_expire: end waiting jobs whose queue timeout passed, even when no worker is alive.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  most jobs (and entries) to look at in each of the two passes below (default 1000)
-- Reply    { ended, scanned } — jobs ended here (expired, or dead-lettered: see below), and
--          deadlines plus entries looked at
--
-- A job expires when it never started and enqueued_ms + its queue_timeout_ms (the entry's
-- own, else the queue's) is past. The job ends `expired` (waiters are woken); its entry stays
-- in the stream, marked, until a worker reaches and drops it: deleting entries that were never
-- delivered would spoil the O(1) queue position. Two passes find such jobs, neither reading
-- the backlog:
-- 1. The deadline index (`fleetq:{q}:deadlines`, written by add_entry for every entry a
--    function adds with a queue timeout): the due members are removed, and each one's job is
--    ended if its entry is still waiting (not yet delivered), the job hash names that entry
--    (or has none) and says it never started. Members of entries taken since are dropped.
-- 2. Only when the queue's config sets queue_timeout_ms: entries added since the previous
--    call (cursor `expire_cursor` in the stats hash, never before the group's last-delivered
--    id), each read once — this is how plain-XADD entries, which no function indexed, expire
--    without a worker. An entry due now is ended; one not yet due is indexed. On a queue
--    without queue_timeout_ms in its config, a plain-XADD entry with its own
--    queue_timeout_ms expires when a worker reaches it (fleetq_take).
-- Idempotent; any number of brokers may run it. Also dead-letters pending entries idle past
-- the lease that have no attempt left (their holder died on the last one, and no worker needs
-- to reclaim them to find out), removes consumers idle for 10 minutes with nothing pending
-- (hosts gone for good), forgets nodes not seen for a day, and workflow blocks and
-- suspensions that are over.

-- Ends a waiting job whose queue timeout passed; its entry stays in the stream as a
-- tombstone (see fleetq_cancel), so its hash is kept until a worker drops the entry.
local function end_waiting(K, job_id, entry_id, enqueued, timeout)
  local jk = job_key(K, job_id)
  redis.call('HSET', jk, 'entry', entry_id)
  end_expired(K, job_id, enqueued, timeout)
  redis.call('HSET', jk, 'tombstone', '1')
  mark_entry(K, entry_id)
  redis.call('PERSIST', jk)
  stat(K, 'tombstones')
end

-- Whether job `job_id` of entry `entry_id` still waits there and never started: the entry
-- is not delivered (after `last`, the group's last-delivered id), and the job hash is absent
-- (a job without id nobody took) or waiting, names this entry or none, and has no start.
local function still_waiting(K, job_id, entry_id, last)
  if not id_lt(last, entry_id) then return false end
  local h = redis.call('HMGET', job_key(K, job_id), 'state', 'started_ms', 'entry')
  if h[2] or (h[3] and h[3] ~= entry_id) then return false end
  return not h[1] or h[1] == 'waiting'
end

-- Pass 1: the due members of the deadline index. Returns jobs ended and members looked at.
local function expire_indexed(K, last, now, limit)
  local due = redis.call('ZRANGE', K.deadlines, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
  if #due == 0 then return 0, 0 end
  local ended, members = 0, {}
  for i = 1, #due, 2 do
    local member, deadline = due[i], tonumber(due[i + 1])
    members[#members + 1] = member
    local entry_id, enqueued, job_id = string.match(member, '^(%S+) (%d+) (.+)$')
    if entry_id and still_waiting(K, job_id, entry_id, last) then
      enqueued = tonumber(enqueued)
      end_waiting(K, job_id, entry_id, enqueued, deadline - enqueued)
      ended = ended + 1
    end
  end
  redis.call('ZREM', K.deadlines, unpack(members))
  return ended, #members
end

-- Pass 2: entries added since the previous call, on a queue whose config sets a queue
-- timeout (`default`). Returns jobs ended and entries read.
local function expire_added(K, last, now, limit, default)
  local cursor = redis.call('HGET', K.stats, 'expire_cursor')
  if not cursor or not id_lt(last, cursor) then cursor = last end
  local r = redis.call('XRANGE', K.stream, '(' .. cursor, '+', 'COUNT', limit)
  local ended = 0
  for _, e in ipairs(r) do
    local m = to_map(e[2])
    local timeout = entry_num(m, 'queue_timeout_ms', default)
    local enqueued = entry_num(m, 'enqueued_ms', tonumber(string.match(e[1], '^(%d+)')))
    -- An entry with a bad number is the worker's to dead-letter (malformed), not this step's
    -- to expire.
    if timeout and enqueued and entry_num(m, 'attempts', 0) == 0 and timeout > 0 then
      local job_id = job_id_of(e[1], e[2])
      if enqueued + timeout >= now then
        redis.call('ZADD', K.deadlines, enqueued + timeout, deadline_member(e[1], enqueued, job_id))
      elseif still_waiting(K, job_id, e[1], last) then
        end_waiting(K, job_id, e[1], enqueued, timeout)
        ended = ended + 1
      end
    end
  end
  if #r > 0 then redis.call('HSET', K.stats, 'expire_cursor', r[#r][1]) end
  return ended, #r
end

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
  local g, exists = group_of(K)
  local now = now_ms()
  if not exists then
    -- No stream: no entry waits; index members left by a deleted stream go.
    redis.call('DEL', K.deadlines)
    return { 0, 0 }
  end
  local last = g and g.last or '0-0'
  local expired, scanned = expire_indexed(K, last, now, limit)
  local default = config_num(K, 'queue_timeout_ms', 0)
  if default > 0 then
    local ended, read = expire_added(K, last, now, limit, default)
    expired, scanned = expired + ended, scanned + read
  end
  if g == nil then return { expired, scanned } end
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
  return { expired, scanned }
end

register('fleetq_expire', expire, DRAIN)
