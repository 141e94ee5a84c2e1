-- fencing.lua: who holds a delivered entry, and whether a holder's silence means it is gone.
--
-- A holder is the consumer that owns the entry in the group's pending list *and* presents
-- the token it chose when it took the entry (stored in the queue's holds hash,
-- `fleetq:{q}:holds`, field <entry id>, value '<token> <consumer>'). The token is new for every take, so no rollback of
-- the data set (AOF everysec, an async replica promoted) can make two runs share one: a run
-- whose token is not the entry's current one is fenced. Every step that takes an entry away
-- from its holder (a new take, a reclaim's blame, a drop, a requeue) removes or replaces it.
--
-- The holds hash also carries, for the hot path's sake (one HMGET per batch instead of a read
-- of every job hash): `w:<job id>`, the number of callers waiting on the job (fleetq_watch),
-- and for an entry not yet taken, the value '-' when its job hash says more than the entry
-- does (cancelled or expired while waiting), so that fleetq_take reads that hash first.
--
-- Leases: every take and renewal writes the holder's deadline (server ms) to the leases zset.
-- An entry is stale when its deadline (or, for an entry delivered but never taken, its idle
-- time in the pending list) is a whole lease past. Silence of the whole queue is not death:
-- when no worker has called in for QUIET_LEASES leases (Redis itself was down, frozen or
-- failing over), stale judgments wait one more lease (a grace), so live holders renew first.

-- A queue with no worker call for this many leases was cut off from its workers.
local QUIET_LEASES = 1.5

-- Owner (consumer name), delivery count and idle ms of a pending entry; nil when not pending.
local function pending_owner(K, entry_id)
  local ok, r = pcall(redis.call, 'XPENDING', K.stream, GROUP, entry_id, entry_id, 1)
  if not ok or #r == 0 then return nil, 0, 0 end
  return r[1][2], tonumber(r[1][4]), tonumber(r[1][3])
end

-- The mark of an entry whose job hash must be read before it is taken (see above).
local MARKED = '-'

-- What the holds hash keeps for the holder `consumer` of a take with `token`.
local function hold_value(token, consumer)
  return token .. ' ' .. consumer
end

-- The fencing check: `consumer` still owns the entry and `token` is its current token.
local function owns(K, entry_id, consumer, token)
  if token == nil or token == '' or token == MARKED then return false end
  if pending_owner(K, entry_id) ~= consumer then return false end
  return redis.call('HGET', K.holds, entry_id) == hold_value(token, consumer)
end

-- Marks a waiting entry whose job hash now says more than the entry (see above).
local function mark_entry(K, entry_id)
  redis.call('HSET', K.holds, entry_id, MARKED)
end

-- Records the holder's lease deadline.
local function set_lease(K, entry_id, deadline)
  redis.call('ZADD', K.leases, deadline, entry_id)
end

-- Starts the grace when the queue has been quiet (no worker call) for QUIET_LEASES leases;
-- the call that notices counts as activity, so the grace is not started again at once.
local function notice_quiet(K, lease, now)
  local h = redis.call('HMGET', K.stats, 'active_ms', 'grace_until_ms')
  local active, grace = tonumber(h[1]), tonumber(h[2]) or 0
  if active ~= nil and now - active > lease * QUIET_LEASES then
    grace = now + lease
    redis.call('HSET', K.stats, 'grace_until_ms', tostring(grace), 'active_ms', tostring(now))
    stat(K, 'quiet_spells')
  end
  return grace
end

-- Notes that a worker called in (take, renew, reclaim): after a quiet spell this starts the
-- grace first, whichever call comes back first.
local function worker_called(K, lease, now)
  notice_quiet(K, lease, now)
  redis.call('HSET', K.stats, 'active_ms', tostring(now))
end

-- May stale leases be judged now? False during the grace after a quiet spell.
local function may_judge(K, lease, now)
  return now >= notice_quiet(K, lease, now)
end
