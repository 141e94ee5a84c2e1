-- fleetq_take: a worker took entries (XREADGROUP or reclaim); decide for each whether it runs.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  node name of the caller
-- ARGV[3]  lease in ms (the entry is reclaimable when not renewed within it)
-- ARGV[4]  1 when the job counts as started at once (in-process handlers); 0 when the
--          executor reports the start itself (fleetq_progress … started)
-- ARGV[5]  1 to note the caller alive on the queue (the nodes zset, the queue's last worker
--          call); a worker sends it at most every lease/4, so a busy queue pays it rarely
-- ARGV[6…] per entry, 11 values: entry_id, job_id, token (chosen by the caller, new for every
--          take: the fencing token its renewals, progress reports and commit present),
--          prior_attempts, max_attempts, queue_deadline_ms (0 = none), enqueued_ms, avoid
--          (comma-separated nodes or ''), avoid_until_ms (0 = none), workflow (or ''), passes
--          (times handed on so far)
-- Reply    per entry { entry_id, decision, deliveries, n }, decision one of
--          run        the caller owns it and runs it; n is this attempt's number;
--          lost       not owned by the caller;
--          duplicate  another entry already carries this job id, or the job has ended;
--          cancelled  a producer cancelled it;
--          expired    its queue timeout passed before it started;
--          dead       no attempt left (the last holders lost their leases), or delivered
--                     DELIVERIES_MAX times without ever starting;
--          pass       the caller's node is avoided for this job (it failed it, or the job's
--                     workflow, within failover_cooldown_ms) and another eligible node is
--                     alive: the job goes back in line, shortly, without using an attempt
--                     (n is then the delay in ms before it is due).
--
-- Attempts are counted when a job starts (here when ARGV[4] is 1, else at fleetq_progress
-- 'started'), not when it is delivered: a delivery lost before it started costs nothing.
--
-- Cost: per batch one XPENDING (ownership), one HMGET of the holds hash, one ZADD (leases) and
-- one HSET (tokens); per entry one HSET of the job record. The job record is read first only
-- when it may say more than the entry: the job has an id of its own, the entry was delivered
-- before, carries attempts, an avoid list, a workflow or a passed queue deadline, or is marked
-- in the holds hash (cancelled or expired while waiting).

local PASS_DELAY_MS = 250
local PASS_DELAY_MAX_MS = 5000
-- Deliveries of one entry that never led to a start before it is dead-lettered (a job that
-- kills every worker that reads it, say).
local DELIVERIES_MAX = 20
local TAKE_STRIDE = 11
local TOKEN_PATTERN = '^%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x$'

local function take_dead(K, job_id, entry_id, reason, used, nodes)
  local fields = entry_fields(K, entry_id)
  dead_letter(K, job_id, fields, 'deliveries_exhausted', reason, used, nodes)
  drop_entry(K, entry_id)
  finish(K, job_id, 'dead', { 'error', reason, 'reason', 'deliveries_exhausted' })
  emit(K, 'dead', job_id, { 'reason', 'deliveries_exhausted' })
end

-- Small counts as text without formatting a number (Lua's tostring is a printf).
local SMALL = { [0] = '0', '1', '2', '3' }
local function small(n) return SMALL[n] or tostring(n) end

-- The caller runs a plain job's first delivery (entry `id`, which is its job id, enqueued at
-- `enqueued_ms`, allowed `max_attempts_s` attempts): what take_run writes for it, with one
-- HSET of literal fields (no record read, nothing carried over to clear). Returns 1, the
-- attempt's number.
local function take_plain(K, T, id, token, enqueued_ms, max_attempts_s)
  local jk = job_key(K, id)
  if T.started_now then
    redis.call('HSET', jk, 'state', 'running', 'entry', id, 'consumer', T.consumer, 'node', T.node,
      'attempt', '1', 'attempts', '1', 'max_attempts', max_attempts_s, 'taken_ms', T.now_s,
      'nodes', T.node, 'enqueued_ms', enqueued_ms, 'deliveries', '1', 'attempt_started_ms', T.now_s,
      'started_ms', T.now_s)
  else
    redis.call('HSET', jk, 'state', 'taken', 'entry', id, 'consumer', T.consumer, 'node', T.node,
      'attempt', '1', 'attempts', '0', 'max_attempts', max_attempts_s, 'taken_ms', T.now_s,
      'nodes', T.node, 'enqueued_ms', enqueued_ms, 'deliveries', '1')
  end
  T.leases[#T.leases + 1] = T.deadline_s
  T.leases[#T.leases + 1] = id
  T.tokens[#T.tokens + 1] = id
  T.tokens[#T.tokens + 1] = hold_value(token, T.consumer)
  if T.routine then
    emit(K, T.started_now and 'started' or 'taken', id, { 'node', T.node, 'attempt', '1' })
  end
  return 1
end

-- The caller runs it: record the holder; its token and lease go into T.tokens and T.leases,
-- written once for the batch.
local function take_run(K, T, e, h, used, deliveries)
  local jk = job_key(K, e.job_id)
  local nodes = h[4] or ''
  if nodes ~= '' then nodes = nodes .. ',' end
  nodes = nodes .. T.node
  local attempt = used + 1
  local counted = T.started_now and attempt or used
  local set = { 'HSET', jk, 'state', T.started_now and 'running' or 'taken', 'entry', e.entry_id,
    'consumer', T.consumer, 'node', T.node, 'attempt', small(attempt),
    'attempts', small(counted), 'max_attempts', e.max_attempts_s, 'taken_ms', T.now_s,
    'nodes', nodes, 'enqueued_ms', e.enqueued, 'deliveries', small(deliveries) }
  if T.started_now then
    set[#set + 1] = 'attempt_started_ms'
    set[#set + 1] = T.now_s
    if not h[5] then
      set[#set + 1] = 'started_ms'
      set[#set + 1] = T.now_s
    end
  end
  redis.call(unpack(set))
  if attempt > 1 or h[1] then
    -- An earlier attempt's progress and timeout do not describe this one; a scheduled job's
    -- copy of its fields is not needed once it runs (the end is recorded without reading
    -- the record, so nothing is left behind for it to clean).
    redis.call('HDEL', jk, 'progress', 'progress_ms', 'stages', 'timeout', 'timeout_stage',
      'timeout_elapsed_ms', 'timeout_node', 'retry')
    if attempt == 1 then redis.call('HDEL', jk, 'error') end
    if not T.started_now then redis.call('HDEL', jk, 'attempt_started_ms') end
    redis.call('PERSIST', jk)
  end
  T.leases[#T.leases + 1] = T.deadline_s
  T.leases[#T.leases + 1] = e.entry_id
  T.tokens[#T.tokens + 1] = e.entry_id
  T.tokens[#T.tokens + 1] = hold_value(e.token, T.consumer)
  if T.routine then
    emit(K, T.started_now and 'started' or 'taken', e.job_id, { 'node', T.node, 'attempt', tostring(attempt) })
  end
  return attempt
end

local function avoided_here(K, T, e)
  if e.avoid_until > T.now and contains(e.avoid, T.node) then return true end
  if e.workflow == '' then return false end
  local blocked = tonumber(redis.call('HGET', K.blocks, block_field(e.workflow, T.node)))
  return blocked ~= nil and blocked > T.now
end

-- Decides for one entry the caller owns.
local function take_owned(K, T, e, deliveries)
  local jk = job_key(K, e.job_id)
  local h = redis.call('HMGET', jk, 'state', 'entry', 'cancel', 'nodes', 'started_ms', 'tombstone', 'attempts')
  local state, known_entry = h[1], h[2]
  -- Attempts used so far: the job record's count while it describes this entry, else the
  -- count the entry carries from earlier entries of the job.
  local used = e.prior
  if known_entry == e.entry_id then used = tonumber(h[7]) or e.prior end
  if (known_entry and known_entry ~= e.entry_id) or TERMINAL[state] then
    drop_duplicate(K, jk, e.entry_id, h)
    return 'duplicate', used
  elseif h[3] == '1' then
    drop_entry(K, e.entry_id)
    finish(K, e.job_id, 'cancelled')
    emit(K, 'cancelled', e.job_id)
    return 'cancelled', used
  elseif e.deadline > 0 and T.now > e.deadline and not h[5] then
    drop_entry(K, e.entry_id)
    local enq = tonumber(e.enqueued) or T.now
    end_expired(K, e.job_id, enq, e.deadline - enq)
    return 'expired', used
  elseif used >= e.max_attempts then
    end_exhausted(K, e.job_id, e.entry_id, entry_fields(K, e.entry_id), used, e.max_attempts, h[4] or '')
    return 'dead', used
  elseif deliveries > DELIVERIES_MAX then
    take_dead(K, e.job_id, e.entry_id, 'delivered ' .. deliveries .. ' times and never started: ' ..
      'every worker that read it died or lost it before the start', used, h[4] or '')
    return 'dead', used
  elseif deliveries == 1 and avoided_here(K, T, e)
    and other_node_eligible(K, T.node, e.avoid_until > T.now and e.avoid or {}, e.workflow, T.now) then
    local delay = math.min(PASS_DELAY_MS * 2 ^ e.passes, PASS_DELAY_MAX_MS)
    if not requeue(K, e.job_id, e.entry_id, { passes = tostring(e.passes + 1) }, delay, T.now) then
      return 'dead', used
    end
    stat(K, 'passed')
    return 'pass', delay
  end
  return 'run', take_run(K, T, e, h, used, deliveries)
end

-- The numbers among an entry's values (offset in its stride, name, range): checked by the rule
-- of base.lua before anything is written. The worker derives them from an entry it checked.
local TAKE_NUMBERS = {
  { 3, 'prior_attempts', ENTRY_NUMBERS.attempts },
  -- Up to 2^32-1: what a worker passes for an entry it found malformed.
  { 4, 'max_attempts', { 1, 4294967295 } },
  { 5, 'queue_deadline_ms', { 0, 2 * ENTRY_NUMBERS.enqueued_ms[2] } },
  { 6, 'enqueued_ms', ENTRY_NUMBERS.enqueued_ms },
  { 8, 'avoid_until_ms', ENTRY_NUMBERS.avoid_until },
  { 10, 'passes', ENTRY_NUMBERS.passes },
}

-- One entry's values, or nil and what is wrong with them.
local function take_entry(args, i)
  local token = args[i + 2]
  if token ~= '' and not string.match(token, TOKEN_PATTERN) then
    return nil, shown(token) .. ' is not a token of 16 hex digits'
  end
  local n = {}
  for _, t in ipairs(TAKE_NUMBERS) do
    n[t[2]] = whole(args[i + t[1]], t[3])
    if n[t[2]] == nil then
      return nil, t[2] .. ' ' .. shown(args[i + t[1]]) .. ' of entry ' .. shown(args[i]) ..
        ' is not a whole number from ' .. t[3][1] .. ' to ' .. t[3][2]
    end
  end
  return {
    entry_id = args[i], job_id = args[i + 1], token = token,
    prior = n.prior_attempts, max_attempts = n.max_attempts, max_attempts_s = args[i + 4],
    deadline = n.queue_deadline_ms, enqueued = args[i + 6],
    avoid = split_csv(args[i + 7]), avoid_until = n.avoid_until_ms,
    workflow = args[i + 9] or '', passes = n.passes,
  }
end

-- May the entry be taken without reading its job record? Only a first delivery of a job
-- without an id of its own (so no other entry or record can name it), with nothing carried
-- over from earlier attempts, and no mark in the holds hash.
local function plain_first(T, e, deliveries, mark)
  return deliveries == 1 and mark == false and e.job_id == e.entry_id and e.prior == 0 and #e.avoid == 0
    and e.workflow == '' and (e.deadline == 0 or T.now <= e.deadline)
end

-- Delivery counts of the entries the caller owns among `entries`, by entry id: one XPENDING
-- over their id range, for the caller only (it holds at most its slots and this batch).
local function owned_deliveries(K, consumer, entries)
  -- Each id is parsed once (not once per comparison, as id_lt would): a take of 8 spends a
  -- few µs per job less. Ids that are not of the form ms-seq are left out of the range.
  local lo, hi, lo_m, lo_s, hi_m, hi_s = nil, nil, 0, 0, 0, 0
  for _, e in ipairs(entries) do
    local m, q = string.match(e.entry_id, '^(%d+)%-(%d+)$')
    if m ~= nil then
      m, q = tonumber(m), tonumber(q)
      if lo == nil or m < lo_m or (m == lo_m and q < lo_s) then lo, lo_m, lo_s = e.entry_id, m, q end
      if hi == nil or m > hi_m or (m == hi_m and q > hi_s) then hi, hi_m, hi_s = e.entry_id, m, q end
    end
  end
  if lo == nil then lo, hi = entries[1].entry_id, entries[1].entry_id end
  local limit = 4 * #entries + 256
  local ok, r = pcall(redis.call, 'XPENDING', K.stream, GROUP, lo, hi, limit, consumer)
  local out = {}
  if not ok then return out end
  for _, p in ipairs(r) do out[p[1]] = tonumber(p[4]) end
  if #r >= limit then
    -- More of the caller's entries in that range than expected: ask for the rest one by one.
    for _, e in ipairs(entries) do
      if out[e.entry_id] == nil then
        local owner, deliveries = pending_owner(K, e.entry_id)
        if owner == consumer then out[e.entry_id] = deliveries end
      end
    end
  end
  return out
end

local TAKE_HEADER = 5

-- The header both forms share (ARGV[1…5]): T, or nil and what is wrong.
local function take_header(K, args)
  local T = { consumer = args[1], node = args[2], lease = whole(args[3], CONFIG_NUMBERS.lease_ms),
    started_now = args[4] == '1', now = now_ms(), leases = {}, tokens = {} }
  if T.lease == nil then
    return nil, 'lease ' .. shown(args[3]) .. ' is not a whole number from ' ..
      CONFIG_NUMBERS.lease_ms[1] .. ' to ' .. CONFIG_NUMBERS.lease_ms[2] .. ' ms'
  end
  T.now_s = tostring(T.now)
  T.deadline_s = tostring(T.now + T.lease)
  -- Routine events (taken, started) are written only when the queue asks for them.
  T.routine = config_num(K, 'routine_events', 0) == 1
  return T
end

-- Decides for each of `entries` (delivery counts of those the caller owns in `owned`, their
-- marks in `marks`), appending a reply row to `out`.
local function take_each(K, T, entries, owned, marks, out)
  for i, e in ipairs(entries) do
    local deliveries = owned[e.entry_id]
    if deliveries == nil or e.token == '' then
      out[#out + 1] = { e.entry_id, 'lost', deliveries or 0, 0 }
    elseif plain_first(T, e, deliveries, marks[i]) then
      out[#out + 1] = { e.entry_id, 'run', deliveries, take_plain(K, T, e.entry_id, e.token, e.enqueued, e.max_attempts_s) }
    else
      local decision, n = take_owned(K, T, e, deliveries)
      out[#out + 1] = { e.entry_id, decision, deliveries, n }
    end
  end
end

-- Decides for checked `entries` (their ids in `ids`) and writes the batch's leases and tokens
-- (those of T, which the caller may have added to: fleetq_take_next's own takes).
-- `owned`: the delivery counts of the entries the caller owns, by entry id, when the caller
-- of take_batch knows them (it read them itself); else they are looked up.
local function take_batch(K, T, entries, ids, beat, owned)
  if beat then
    seen(K, T.node)
    worker_called(K, T.lease, T.now)
  end
  local out = {}
  if #entries > 0 then
    owned = owned or owned_deliveries(K, T.consumer, entries)
    local marks = redis.call('HMGET', K.holds, unpack(ids))
    take_each(K, T, entries, owned, marks, out)
  end
  if #T.leases > 0 then
    redis.call('ZADD', K.leases, unpack(T.leases))
    redis.call('HSET', K.holds, unpack(T.tokens))
  end
  return out
end

local function take(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  if #args < TAKE_HEADER or (#args - TAKE_HEADER) % TAKE_STRIDE ~= 0 then
    return redis.error_reply('fleetq: fleetq_take takes ' .. TAKE_HEADER .. ' values and then ' .. TAKE_STRIDE ..
      ' per entry; got ' .. #args .. ' (a worker of another protocol version?)')
  end
  local T, bad = take_header(K, args)
  if T == nil then return redis.error_reply('fleetq: fleetq_take: ' .. bad) end
  -- Every entry is checked before anything is written.
  local entries, ids = {}, {}
  for i = TAKE_HEADER + 1, #args, TAKE_STRIDE do
    local e, wrong = take_entry(args, i)
    if e == nil then
      return redis.error_reply('fleetq: fleetq_take: ' .. wrong ..
        ' (a worker of another protocol version?); upgrade the worker with the library')
    end
    entries[#entries + 1] = e
    ids[#ids + 1] = e.entry_id
  end
  return take_batch(K, T, entries, ids, args[5] == '1')
end

-- fleetq_take_fresh: fleetq_take for first deliveries of plain jobs, in 2 values per entry
-- instead of 11 (the common case of a busy queue: what fleetq_take would be told is derived
-- here, which costs Redis less than receiving it).
--
-- KEYS[1]  queue stream key
-- ARGV[1…5] as fleetq_take's
-- ARGV[6]  max_attempts of the queue (the entries carry none)
-- ARGV[7]  queue_timeout_ms of the queue (0 = none; the entries carry none)
-- ARGV[8…] per entry, 2 values: entry_id, token
-- Reply    as fleetq_take's
--
-- An entry may be passed so only when the caller read it with `>` (its first delivery) and it
-- carries none of the fields id, attempts, max_attempts, queue_timeout_ms, avoid,
-- avoid_until, workflow, passes: its job id is then its entry id, its enqueued_ms its entry
-- id's time, and nothing was carried over from earlier attempts. Ownership, marks in the
-- holds hash (cancelled or expired while waiting) and the delivery count are checked as
-- fleetq_take checks them, and decided the same way.
local FRESH_HEADER = 7
local NO_AVOID = {}

-- The header of fleetq_take_fresh (and fleetq_take_next): take_header's T with the queue's
-- max_attempts and queue timeout, or nil and what is wrong.
local function fresh_header(K, args)
  local T, bad = take_header(K, args)
  if T == nil then return nil, bad end
  T.max_attempts = whole(args[6], { 1, 4294967295 })
  T.max_attempts_s = args[6]
  T.queue_timeout = whole(args[7], { 0, ENTRY_NUMBERS.enqueued_ms[2] })
  if T.max_attempts == nil or T.queue_timeout == nil then
    return nil, 'max_attempts ' .. shown(args[6]) .. ' or queue_timeout_ms ' .. shown(args[7]) ..
      ' is not a whole number of its range'
  end
  return T
end

-- A plain job's first delivery as take_batch's entry: entry `id` (time `ms`, its digits), `token`.
local function fresh_entry(T, id, token, ms)
  local deadline = 0
  if T.queue_timeout > 0 then deadline = tonumber(ms) + T.queue_timeout end
  return { entry_id = id, job_id = id, token = token, prior = 0, max_attempts = T.max_attempts,
    max_attempts_s = T.max_attempts_s, deadline = deadline, enqueued = ms, avoid = NO_AVOID,
    avoid_until = 0, workflow = '', passes = 0 }
end

local function take_fresh(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  if #args < FRESH_HEADER or (#args - FRESH_HEADER) % 2 ~= 0 then
    return redis.error_reply('fleetq: fleetq_take_fresh takes ' .. FRESH_HEADER ..
      ' values and then 2 per entry; got ' .. #args .. ' (a worker of another protocol version?)')
  end
  local T, bad = fresh_header(K, args)
  if T == nil then return redis.error_reply('fleetq: fleetq_take_fresh: ' .. bad) end
  local entries, ids = {}, {}
  for i = FRESH_HEADER + 1, #args, 2 do
    local id, token = args[i], args[i + 1]
    local ms = string.match(id, '^(%d+)%-%d+$')
    if ms == nil or (token ~= '' and not string.match(token, TOKEN_PATTERN)) then
      return redis.error_reply('fleetq: fleetq_take_fresh: entry ' .. shown(id) .. ' with token ' .. shown(token) ..
        ': expected an entry id and a token of 16 hex digits')
    end
    entries[#entries + 1] = fresh_entry(T, id, token, ms)
    ids[#ids + 1] = id
  end
  return take_batch(K, T, entries, ids, args[5] == '1')
end

register('fleetq_take', take, DRAIN)
register('fleetq_take_fresh', take_fresh, DRAIN)
