-- common.lua: helpers shared by every fleetq function. Prepended to the library.
--
-- Key layout: every function takes the queue's stream key `fleetq:{q}:stream` as KEYS[1]
-- and derives the queue's other keys from it (they share the `{q}` hash tag, so they live
-- in the same Redis Cluster slot). The table of keys is in broker/src/keys.rs and
-- docs/protocol.md; the suffixes below must match it.

local GROUP = 'workers'

local DEFAULT_RETENTION_MS = 3600000
local DEFAULT_EVENTS_MAXLEN = 10000
-- A node that failed a job (or its workflow) is avoided for it this long.
local DEFAULT_FAILOVER_COOLDOWN_MS = 60000
-- A job that failed on this many distinct nodes is poison.
local DEFAULT_POISON_NODES = 3
-- A node is alive while it was seen (fleetq_take, fleetq_renew, fleetq_reclaim) this recently;
-- an idle worker reclaims at least every 10 s, a busy one renews every lease/3.
local NODE_ALIVE_MS = 30000
-- Attempt records kept per job.
local HISTORY_MAX = 20
-- Plain-XADD jobs carry no `seq` field; their position is counted with XRANGE up to this.
local POSITION_SCAN_LIMIT = 1000

-- Per-call caches, reset by `register`'s wrapper at the start of every function call: the
-- server's time (frozen during a call anyway) and the queue's config hash.
local call_now = nil
local call_config = nil

local function now_ms()
  if call_now == nil then
    local t = redis.call('TIME')
    call_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return call_now
end

-- Registers a fleetq function; every call starts with empty per-call caches.
local function register(name, fn, flags)
  redis.register_function{ function_name = name, flags = flags, callback = function(keys, args)
    call_now = nil
    call_config = nil
    return fn(keys, args)
  end }
end

local function queue_keys(stream_key)
  if string.sub(stream_key, -7) ~= ':stream' then
    return error('fleetq: KEYS[1] must be a queue stream key such as fleetq:{q}:stream, got: ' .. stream_key)
  end
  local p = string.sub(stream_key, 1, #stream_key - 6)
  return {
    prefix = p,
    stream = stream_key,
    delayed = p .. 'delayed',
    dead = p .. 'dead',
    events = p .. 'events',
    config = p .. 'config',
    leases = p .. 'leases',
    stats = p .. 'stats',
    nodes = p .. 'nodes',
    suspended = p .. 'suspended',
    blocks = p .. 'blocks',
  }
end

local function job_key(K, job_id) return K.prefix .. 'job:' .. job_id end
local function notify_key(K, job_id) return K.prefix .. 'notify:' .. job_id end

local function to_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

local TERMINAL = { succeeded = true, failed = true, dead = true, expired = true, cancelled = true }

-- A number from the queue's config hash (read once per call), or `default`.
local function config_num(K, name, default)
  if call_config == nil or call_config.key ~= K.config then
    call_config = { key = K.config, map = to_map(redis.call('HGETALL', K.config)) }
  end
  local v = tonumber(call_config.map[name])
  if v == nil then return default end
  return v
end

-- The fields of one stream entry as a flat array, or nil when the entry is gone.
local function entry_fields(K, entry_id)
  local r = redis.call('XRANGE', K.stream, entry_id, entry_id)
  if #r == 0 then return nil end
  return r[1][2]
end

-- The job id of an entry: its `id` field, else the entry id itself.
local function job_id_of(entry_id, fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then return fields[i + 1] end
  end
  return entry_id
end

-- Owner (consumer name) and delivery count of a pending entry, or nil when not pending.
local function pending_owner(K, entry_id)
  local ok, r = pcall(redis.call, 'XPENDING', K.stream, GROUP, entry_id, entry_id, 1)
  if not ok or #r == 0 then return nil, 0 end
  return r[1][2], tonumber(r[1][4])
end

-- The fencing check: the caller still holds this delivery of the entry.
local function owns(K, entry_id, consumer, deliveries)
  local owner, count = pending_owner(K, entry_id)
  return owner == consumer and count == tonumber(deliveries)
end

local function emit(K, kind, job_id, extra)
  local maxlen = config_num(K, 'events_maxlen', DEFAULT_EVENTS_MAXLEN)
  if maxlen <= 0 then return end
  local args = { 'XADD', K.events, 'MAXLEN', '~', maxlen, '*', 'type', kind, 'job', job_id }
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

local function stat(K, field, n)
  redis.call('HINCRBY', K.stats, field, n or 1)
end

-- Add an entry to the stream, stamping it with its sequence number `seq` (the stream's
-- entries-added counter after the add) so that its queue position is O(1) to compute.
-- Fields named in `drop` are left out. Returns the new entry id and its seq.
local function add_entry(K, flat, drop)
  local added = 0
  if redis.call('EXISTS', K.stream) == 1 then
    local info = to_map(redis.call('XINFO', 'STREAM', K.stream))
    added = tonumber(info['entries-added']) or 0
  end
  local seq = added + 1
  local args = { 'XADD', K.stream, '*' }
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f ~= 'seq' and not (drop and drop[f]) then
      args[#args + 1] = f
      args[#args + 1] = flat[i + 1]
    end
  end
  args[#args + 1] = 'seq'
  args[#args + 1] = tostring(seq)
  local id = redis.call(unpack(args))
  return id, seq
end

local function group_state(K)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', K.stream)
  if not ok then return nil end
  for _, g in ipairs(groups) do
    local m = to_map(g)
    if m['name'] == GROUP then return m end
  end
  return nil
end

local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am == nil or bm == nil then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- 1-based position of a waiting entry (how many undelivered entries are at or before it),
-- or 0 when the entry has already been delivered to a worker.
local function position_of(K, entry_id, seq)
  local g = group_state(K)
  if g ~= nil then
    if not id_lt(g['last-delivered-id'], entry_id) then return 0 end
    local read = tonumber(g['entries-read'])
    if read == nil and g['last-delivered-id'] == '0-0' then
      -- A group that has delivered nothing yet has read nothing (Redis 7.0 reports no count).
      read = 0
      if seq then
        local info = to_map(redis.call('XINFO', 'STREAM', K.stream))
        read = (tonumber(info['entries-added']) or 0) - tonumber(info['length'])
      end
    end
    if seq and read then return tonumber(seq) - read end
    local r = redis.call('XRANGE', K.stream, '(' .. g['last-delivered-id'], entry_id, 'COUNT', POSITION_SCAN_LIMIT)
    if #r > 0 and r[#r][1] == entry_id then return #r end
    return POSITION_SCAN_LIMIT + 1
  end
  -- No consumer group yet: nothing was delivered.
  if seq then
    local info = to_map(redis.call('XINFO', 'STREAM', K.stream))
    return tonumber(seq) - ((tonumber(info['entries-added']) or 0) - tonumber(info['length']))
  end
  local r = redis.call('XRANGE', K.stream, '-', entry_id, 'COUNT', POSITION_SCAN_LIMIT)
  if #r > 0 and r[#r][1] == entry_id then return #r end
  return POSITION_SCAN_LIMIT + 1
end

-- End a job: set its terminal state, wake its waiters, start its retention clock.
local function finish(K, job_id, state, fields)
  local jk = job_key(K, job_id)
  local args = { 'HSET', jk, 'state', state, 'ended_ms', tostring(now_ms()) }
  if fields then
    for i = 1, #fields do args[#args + 1] = fields[i] end
  end
  redis.call(unpack(args))
  if state == 'succeeded' then
    redis.call('HDEL', jk, 'retry', 'cancel', 'error')
  else
    redis.call('HDEL', jk, 'retry', 'cancel')
  end
  local waiters = tonumber(redis.call('HGET', jk, 'waiters')) or 0
  if waiters > 0 then
    local nk = notify_key(K, job_id)
    for _ = 1, waiters do redis.call('RPUSH', nk, state) end
    redis.call('PEXPIRE', nk, 60000)
    redis.call('HDEL', jk, 'waiters')
  end
  local retention = config_num(K, 'retention_ms', DEFAULT_RETENTION_MS)
  if retention <= 0 then retention = DEFAULT_RETENTION_MS end
  redis.call('PEXPIRE', jk, retention)
  stat(K, state)
end

-- Remove a delivered entry from the group and the stream (the entry is finished).
local function drop_entry(K, entry_id)
  redis.call('XACK', K.stream, GROUP, entry_id)
  redis.call('XDEL', K.stream, entry_id)
  redis.call('ZREM', K.leases, entry_id)
end

-- Copy an entry to the dead-letter stream with its reason.
local function dead_letter(K, job_id, fields, reason, err, attempts, nodes)
  local args = { 'XADD', K.dead, '*', 'job', job_id, 'reason', reason, 'error', err or '',
    'attempts', tostring(attempts or 0), 'nodes', nodes or '', 'dead_ms', tostring(now_ms()) }
  if fields then
    for i = 1, #fields, 2 do
      args[#args + 1] = 'f:' .. fields[i]
      args[#args + 1] = fields[i + 1]
    end
  end
  redis.call(unpack(args))
end

local function split_csv(s)
  local out = {}
  if s == nil or s == false or s == '' then return out end
  for part in string.gmatch(s, '[^,]+') do out[#out + 1] = part end
  return out
end

local function contains(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

-- Note that `node` is alive (called by fleetq_take, fleetq_renew and fleetq_reclaim).
local function seen(K, node)
  if node and node ~= '' then redis.call('ZADD', K.nodes, now_ms(), node) end
end

local function block_field(workflow, node) return workflow .. '|' .. node end

-- May `node` run a job that avoids `avoid` and belongs to `workflow` now?
local function node_eligible(K, node, avoid, workflow, now)
  if contains(avoid, node) then return false end
  local until_ms = tonumber(redis.call('HGET', K.suspended, node))
  if until_ms and until_ms > now then return false end
  if workflow ~= '' then
    local blocked = tonumber(redis.call('HGET', K.blocks, block_field(workflow, node)))
    if blocked and blocked > now then return false end
  end
  return true
end

-- Is any node other than `self` alive and eligible for the job?
local function other_node_eligible(K, self, avoid, workflow, now)
  local alive = redis.call('ZRANGE', K.nodes, now - NODE_ALIVE_MS, '+inf', 'BYSCORE')
  for _, n in ipairs(alive) do
    if n ~= self and node_eligible(K, n, avoid, workflow, now) then return true end
  end
  return false
end

-- Append one attempt record to the job's history (JSON array, last HISTORY_MAX kept).
local function record_attempt(K, jk, rec)
  local raw = redis.call('HGET', jk, 'history')
  local hist = {}
  if raw then
    local ok, v = pcall(cjson.decode, raw)
    if ok and type(v) == 'table' then hist = v end
  end
  hist[#hist + 1] = rec
  while #hist > HISTORY_MAX do table.remove(hist, 1) end
  redis.call('HSET', jk, 'history', cjson.encode(hist))
end

-- Put a delivered entry's job back in line as a new entry: at once (delay 0) or through the
-- delayed set. `set` holds fields to set on the new entry (attempts, avoid, …). The old
-- entry is acknowledged and deleted.
local function requeue(K, job_id, entry_id, set, delay, now)
  local fields = entry_fields(K, entry_id) or {}
  local keep = {}
  local have_id, have_enq = false, false
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'id' then have_id = true end
    if f == 'enqueued_ms' then have_enq = true end
    if f ~= 'seq' and set[f] == nil then
      keep[#keep + 1] = f
      keep[#keep + 1] = fields[i + 1]
    end
  end
  if not have_id then
    keep[#keep + 1] = 'id'
    keep[#keep + 1] = job_id
  end
  if not have_enq then
    keep[#keep + 1] = 'enqueued_ms'
    keep[#keep + 1] = string.match(entry_id, '^(%d+)')
  end
  for f, v in pairs(set) do
    if v ~= '' then
      keep[#keep + 1] = f
      keep[#keep + 1] = v
    end
  end
  drop_entry(K, entry_id)
  local jk = job_key(K, job_id)
  if delay <= 0 then
    local new_id, seq = add_entry(K, keep)
    stat(K, 'readded')
    redis.call('HSET', jk, 'state', 'waiting', 'entry', new_id, 'seq', tostring(seq))
    redis.call('HDEL', jk, 'consumer', 'due_ms', 'retry')
  else
    redis.call('HSET', jk, 'state', 'retrying', 'retry', cjson.encode(keep), 'due_ms', tostring(now + delay))
    redis.call('HDEL', jk, 'entry', 'consumer')
    redis.call('ZADD', K.delayed, now + delay, job_id)
  end
end

-- End a job whose queue timeout passed before it started (`timeout_ms` after `enqueued`).
local function end_expired(K, job_id, enqueued, timeout_ms)
  local waited = now_ms() - enqueued
  finish(K, job_id, 'expired', { 'error', 'queue timeout: not started within ' .. timeout_ms ..
    ' ms (waited ' .. waited .. ' ms)', 'timeout', 'queue', 'enqueued_ms', tostring(enqueued) })
  stat(K, 'timeout:queue')
  emit(K, 'expired', job_id, { 'waited_ms', tostring(waited) })
end

-- Dead-letter a delivered entry whose job used all its attempts, the last holders having lost
-- their leases; the entry leaves the stream.
local function end_exhausted(K, job_id, entry_id, fields, used, max, nodes)
  local reason = 'attempts exhausted: ' .. used .. ' of ' .. max ..
    ' used; the last holder lost its lease (dead, frozen or partitioned host)'
  dead_letter(K, job_id, fields, 'attempts_exhausted', reason, used, nodes)
  drop_entry(K, entry_id)
  finish(K, job_id, 'dead', { 'error', reason, 'reason', 'attempts_exhausted', 'attempts', tostring(used) })
  emit(K, 'dead', job_id, { 'reason', 'attempts_exhausted' })
end
