-- fleetq_reclaim: a worker with free slots takes over entries whose holder's lease ran out.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  lease in ms
-- ARGV[3]  most entries to claim: the caller's free slots, or more for a caller in the watch,
--          which puts back in line at once what it cannot run (fleetq_complete release)
-- ARGV[4]  node name of the caller (marks the node alive)
-- ARGV[5]  optional: the longest the caller sleeps while it does not watch (its max_block,
--          ms); given, the caller takes part in the watch (below)
-- ARGV[6]  optional, with ARGV[5]: how many entries the caller holds now (default 0)
-- Reply    { entries, next_wake_ms, now_ms } — entries as XCLAIM gives them
--          ({ {id, {field, value, …}}, … }); the caller passes them to fleetq_take (the claim
--          raised their delivery count; the attempt counts only when the job starts again).
--          next_wake_ms: when the caller should call again. Without ARGV[5]: the earliest time
--          something may become due here (a lease deadline or a delayed job), 0 when nothing
--          is pending. With ARGV[5]: for a watcher the same, but at most a lease from now;
--          for every other caller 0 (it calls again after ARGV[5]).
--          now_ms: the server's clock, to turn next_wake_ms into a delay.
--
-- Promotes due delayed jobs first, so a fleet with no broker still retries. Stale entries are
-- those whose recorded lease deadline passed (the leases zset) and, for entries delivered but
-- never taken (no lease record), those idle in the pending list for a whole lease (walked with
-- a cursor kept in the stats hash). Never the caller's own entries: a worker renews its own,
-- and re-reads any it forgot. Nothing is judged stale during the grace after a quiet spell
-- (see fencing.lua): an outage of Redis is not the death of its workers. An empty pending list
-- (one XPENDING summary) means nothing can be stale: no lease is read and nothing walked.
--
-- The watch: the idle workers of a queue share its deadlines. WATCH_SEATS of them, the
-- watchers, do the work above and call again by the next deadline and at least once a lease,
-- so each sees every lease before that lease can run out (a lease lasts a whole lease from its
-- take or renewal); two, so that one watcher freezing (with jobs of its own, perhaps) leaves
-- the leases followed. Every other idle worker only marks its node alive until its next call
-- (ARGV[5] later) and calls again then; it reads no config, nor anything that may be due. The
-- seats live in the stats hash (`watch:<k>`, the consumer; `watch:<k>:until_ms`, its next
-- call plus half a lease; `watch:<k>:holds`). A caller keeps its seat; else it takes one that
-- is free (never held, given up, or its watcher late), or one whose watcher holds entries when
-- the caller holds none. A caller with no free slot (ARGV[3] 0) gives its seat up, and does
-- nothing else.

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

-- The earliest lease deadline on record, nil when there is none.
local function first_lease(K)
  local first = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

-- Entries in the pending list, 0 when there is no stream or group.
local function pending_count(K)
  local ok, r = pcall(redis.call, 'XPENDING', K.stream, GROUP)
  if not ok then return 0 end
  return tonumber(r[1]) or 0
end

-- May an entry be pending without a lease record (delivered, never taken)? Only when there
-- are fewer lease records than pending entries.
local function untaken_possible(K, pending)
  return #redis.call('ZRANGE', K.leases, pending - 1, pending - 1) == 0
end

-- The earliest of the next due delayed job and the next lease deadline `first`, 0 for none.
local function next_wake(next_due, first, now, lease)
  local wake = next_due
  if first then
    local d = first
    -- A lapsed record not claimed now (the caller's own, or one not yet idle a lease): look
    -- again a little later, not at once.
    if d <= now then d = now + math.max(100, math.floor(lease / 4)) end
    if wake == 0 or d < wake then wake = d end
  end
  return wake
end

-- Seats of the watch: this many idle workers follow a queue's deadlines, so that a watcher
-- that freezes (holding jobs, perhaps) leaves them followed.
local WATCH_SEATS = 2

local function seat_fields(k)
  return 'watch:' .. k, 'watch:' .. k .. ':until_ms', 'watch:' .. k .. ':holds'
end

-- The seat `consumer` watches from after this call, nil for none (see the header). A caller
-- with no free slot gives up its seat.
local function watch_seat(K, consumer, want, holds, now)
  local names = {}
  for k = 1, WATCH_SEATS do
    for _, name in ipairs({ seat_fields(k) }) do names[#names + 1] = name end
  end
  local v = redis.call('HMGET', K.stats, unpack(names))
  local mine, free_seat, held_seat = nil, nil, nil
  for k = 1, WATCH_SEATS do
    local who, until_ms, held = v[3 * k - 2], tonumber(v[3 * k - 1]) or 0, tonumber(v[3 * k]) or 0
    if who == consumer then
      mine = k
    elseif not who or until_ms < now then
      free_seat = free_seat or k
    elseif holds == 0 and held > 0 then
      held_seat = held_seat or k
    end
  end
  if want == 0 then
    if mine then redis.call('HDEL', K.stats, seat_fields(mine)) end
    return nil
  end
  return mine or free_seat or held_seat
end

-- Marks `node` alive until `until_ms` (its next call): other_node_eligible counts a node alive
-- NODE_ALIVE_MS past its time in the nodes zset, so a node that calls again later than that is
-- entered with that much less.
local function seen_until(K, node, until_ms)
  if node and node ~= '' then
    redis.call('ZADD', K.nodes, math.max(now_ms(), until_ms - NODE_ALIVE_MS), node)
  end
end

local function reclaim(keys, args)
  local K = queue_keys(keys[1])
  local consumer, node = args[1], args[4]
  local lease, want = whole(args[2], CONFIG_NUMBERS.lease_ms), whole(args[3], { 0, 100000 })
  local sleep, holds = nil, 0
  if args[5] then sleep, holds = whole(args[5], MS_RANGE), whole(args[6] or '0', { 0, 100000 }) end
  if lease == nil or want == nil or (args[5] and (sleep == nil or holds == nil)) then
    return redis.error_reply('fleetq: fleetq_reclaim: lease ' .. shown(args[2]) .. ', count ' .. shown(args[3]) ..
      ', sleep ' .. shown(args[5]) .. ' or held ' .. shown(args[6]) .. ' is not a whole number of its range (lease ' ..
      CONFIG_NUMBERS.lease_ms[1] .. ' to ' .. CONFIG_NUMBERS.lease_ms[2] .. ' ms, count and held 0 to 100000, sleep 0 to ' ..
      MS_RANGE[2] .. ' ms)')
  end
  -- The config is read first, as always, except by a caller in the watch: it reads it only
  -- when there is work (a promotion or a claim), still before it writes any of it.
  if not sleep then open_queue(K) end
  local now = now_ms()
  local seat = nil
  if sleep then
    seat = watch_seat(K, consumer, want, holds, now)
    if not seat then
      if want > 0 then seen_until(K, node, now + sleep + lease) end
      return { {}, 0, now }
    end
  end
  -- What may be due: the first delayed job, and (when anything is pending) the first lease
  -- deadline and entries without a lease record.
  local first_due = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
  local next_due = 0
  if #first_due > 0 then next_due = tonumber(first_due[2]) end
  local pending = pending_count(K)
  local first, lapsed, untaken = nil, false, false
  if pending > 0 then
    first = first_lease(K)
    lapsed = first ~= nil and first <= now
    untaken = untaken_possible(K, pending)
  end
  local promote = next_due > 0 and next_due <= now
  local judge_now = want > 0 and (lapsed or untaken)
  if sleep and (promote or judge_now) then open_queue(K) end
  seen(K, node)
  worker_called(K, lease, now)
  if promote then
    local _, left = promote_due(K, now, 100)
    next_due = left
  end
  local claimed, judge = {}, true
  if judge_now then
    judge = may_judge(K, lease, now)
    if judge then
      if lapsed then claim_lapsed(K, consumer, lease, want, now, claimed) end
      if untaken and #claimed < want then claim_untaken(K, consumer, lease, want, now, claimed) end
      if #claimed > 0 then
        stat(K, 'reclaimed', #claimed)
        first = first_lease(K)
      end
    end
  end
  local wake = next_wake(next_due, first, now, lease)
  if not judge then
    local grace = tonumber(redis.call('HGET', K.stats, 'grace_until_ms')) or now
    if wake == 0 or grace < wake then wake = grace + 1 end
  end
  if seat then
    if wake == 0 or wake > now + lease then wake = now + lease end
    local who, until_ms, held = seat_fields(seat)
    redis.call('HSET', K.stats, who, consumer, until_ms, tostring(wake + math.floor(lease / 2)), held, tostring(holds))
  end
  return { claimed, wake, now }
end

register('fleetq_reclaim', reclaim, DRAIN)
