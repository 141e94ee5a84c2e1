-- fleetq_reclaim: a worker with free slots takes over entries whose holder's lease ran out.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  lease in ms
-- ARGV[3]  most entries to claim (the caller's free slots)
-- ARGV[4]  node name of the caller (marks the node alive)
-- Reply    { entries, next_wake_ms, now_ms } — entries as XCLAIM gives them
--          ({ {id, {field, value, …}}, … }); the caller passes them to fleetq_take (the claim
--          raised their delivery count; the attempt counts only when the job starts again).
--          next_wake_ms: the earliest time something may become due here (a lease deadline
--          or a delayed job), 0 when nothing is pending; a worker blocks until then at most.
--          now_ms: the server's clock, to turn next_wake_ms into a delay.
--
-- Promotes due delayed jobs first, so a fleet with no broker still retries. Stale entries are
-- those whose recorded lease deadline passed (the leases zset) and, for entries delivered but
-- never taken (no lease record), those idle in the pending list for a whole lease (walked with
-- a cursor kept in the stats hash). Never the caller's own entries: a worker renews its own,
-- and re-reads any it forgot. Nothing is judged stale during the grace after a quiet spell
-- (see fencing.lua): an outage of Redis is not the death of its workers.

-- Lease records looked at per call, beyond the entries wanted.
local RECLAIM_SCAN = 20
-- Pending entries without a lease record looked at per call.
local UNTAKEN_SCAN = 50

-- Claims `entry_id` for `consumer` when it is still idle a whole lease; records the blame.
local function claim(K, consumer, entry_id, owner, lease, now, claimed)
  blame_lease(K, entry_id, owner, now)
  local r = redis.call('XCLAIM', K.stream, GROUP, consumer, lease, entry_id)
  redis.call('ZREM', K.leases, entry_id)
  if #r > 0 and r[1] then claimed[#claimed + 1] = r[1] end
end

-- Entries whose recorded deadline passed.
local function claim_lapsed(K, consumer, lease, want, now, claimed)
  local due = redis.call('ZRANGE', K.leases, '-inf', now, 'BYSCORE', 'LIMIT', 0, want + RECLAIM_SCAN)
  for _, entry_id in ipairs(due) do
    if #claimed >= want then return end
    local owner, _, idle = pending_owner(K, entry_id)
    if owner == nil then
      redis.call('ZREM', K.leases, entry_id)
    elseif owner ~= consumer and idle >= lease then
      claim(K, consumer, entry_id, owner, lease, now, claimed)
    end
  end
end

-- Entries delivered but never taken (their reader died between XREADGROUP and fleetq_take).
local function claim_untaken(K, consumer, lease, want, now, claimed)
  local cursor = redis.call('HGET', K.stats, 'reclaim_cursor') or '-'
  local ok, r = pcall(redis.call, 'XPENDING', K.stream, GROUP, 'IDLE', lease, cursor, '+', UNTAKEN_SCAN)
  if not ok then return end
  for _, p in ipairs(r) do
    if #claimed >= want then break end
    local entry_id, owner = p[1], p[2]
    if owner ~= consumer and redis.call('ZSCORE', K.leases, entry_id) == false then
      claim(K, consumer, entry_id, owner, lease, now, claimed)
    end
  end
  if #r < UNTAKEN_SCAN then
    redis.call('HDEL', K.stats, 'reclaim_cursor')
  else
    redis.call('HSET', K.stats, 'reclaim_cursor', '(' .. r[#r][1])
  end
end

-- The earliest of the next due delayed job and the next lease deadline, 0 for none.
local function next_wake(K, next_due, now, lease)
  local wake = next_due
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  if #first > 0 then
    local d = tonumber(first[2])
    -- A lapsed record not claimed now (the caller's own, or one not yet idle a lease): look
    -- again a little later, not at once.
    if d <= now then d = now + math.max(100, math.floor(lease / 4)) end
    if wake == 0 or d < wake then wake = d end
  end
  return wake
end

local function reclaim(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local consumer = args[1]
  local lease, want = whole(args[2], CONFIG_NUMBERS.lease_ms), whole(args[3], { 0, 100000 })
  if lease == nil or want == nil then
    return redis.error_reply('fleetq: fleetq_reclaim: lease ' .. shown(args[2]) .. ' or count ' .. shown(args[3]) ..
      ' is not a whole number of its range (lease ' .. CONFIG_NUMBERS.lease_ms[1] .. ' to ' ..
      CONFIG_NUMBERS.lease_ms[2] .. ' ms, count 0 to 100000)')
  end
  local now = now_ms()
  seen(K, args[4])
  local judge = may_judge(K, lease, now)
  worker_called(K, lease, now)
  local _, next_due = promote_due(K, now, 100)
  local claimed = {}
  if want > 0 and judge and redis.call('EXISTS', K.stream) == 1 then
    claim_lapsed(K, consumer, lease, want, now, claimed)
    if #claimed < want then claim_untaken(K, consumer, lease, want, now, claimed) end
    if #claimed > 0 then stat(K, 'reclaimed', #claimed) end
  end
  local wake = next_wake(K, next_due, now, lease)
  if not judge then
    local grace = tonumber(redis.call('HGET', K.stats, 'grace_until_ms')) or now
    if wake == 0 or grace < wake then wake = grace + 1 end
  end
  return { claimed, wake, now }
end

register('fleetq_reclaim', reclaim, DRAIN)
