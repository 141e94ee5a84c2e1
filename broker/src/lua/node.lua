-- Node functions: the record of a worker host, and its suspension on a queue.
--
-- fleetq_node_beat — a worker's heartbeat with news (at start, when busy or the suspension
-- changed, when the record was gone); in between, the worker only renews the record's time to
-- live (PEXPIRE) and looks for a command (HGET), so the time of the last beat is derived when
-- the record is read: its expiry time minus `ttl_ms`.
-- KEYS[1]  the node's record, fleetq:node:<node> (not a queue key: it has no hash tag)
-- ARGV[1]  time to live in ms (the record disappears when the worker stops renewing it);
--          stored as `ttl_ms`
-- ARGV[2…] field/value pairs to set (node, queues, slots, busy, version, consumer, pid, host,
--          started_ms, suspended_until, failure_streak, metrics_addr; docs/protocol.md §16)
-- Reply    the operator's pending command for this node, or '' — 'suspend:<until_ms>' or
--          'resume' — which the call clears (the worker applies it).
--
-- fleetq_node_gone — the broker saw the process of a node's consumer gone (its connections
-- closed): the record leaves the fleet at once instead of after its time to live.
-- KEYS[1]  the node's record, fleetq:node:<node>
-- ARGV[1]  the consumer name whose connections closed
-- Reply    1 when the record was this consumer's and is deleted, else 0 (a newer process of
--          the node wrote it, or it is gone already).
--
-- fleetq_node_state — a node suspends itself on a queue or comes back.
-- KEYS[1]  queue stream key
-- ARGV[1]  node name
-- ARGV[2]  suspended until (ms since the epoch), or 0 to resume
-- ARGV[3]  reason (e.g. '3 failures or timeouts in a row', 'operator')
-- Reply    'ok'. Suspended nodes are left out when fleetq_take looks for another eligible
--          node; the change is an event (node_suspended / node_resumed).

local function node_beat(keys, args)
  local nk = keys[1]
  local ttl = whole(args[1], { 1, MS_RANGE[2] })
  if ttl == nil then
    return redis.error_reply('fleetq: fleetq_node_beat: time to live ' .. shown(args[1]) ..
      ' is not a whole number of ms from 1 to ' .. MS_RANGE[2] .. '; pass 3 heartbeats in ms')
  end
  local set = { 'HSET', nk, 'last_seen_ms', tostring(now_ms()), 'ttl_ms', tostring(ttl) }
  for i = 2, #args do set[#set + 1] = args[i] end
  redis.call(unpack(set))
  redis.call('PEXPIRE', nk, ttl)
  local command = redis.call('HGET', nk, 'command')
  if command then
    redis.call('HDEL', nk, 'command')
    return command
  end
  return ''
end

local function node_gone(keys, args)
  if args[1] == nil or args[1] == '' or redis.call('HGET', keys[1], 'consumer') ~= args[1] then return 0 end
  redis.call('DEL', keys[1])
  return 1
end

local function node_state(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local node, until_ms, reason = args[1], whole(args[2], ENTRY_NUMBERS.avoid_until), args[3] or ''
  if until_ms == nil then
    return redis.error_reply('fleetq: fleetq_node_state: until ' .. shown(args[2]) ..
      ' is not a time in ms from 0 to ' .. ENTRY_NUMBERS.avoid_until[2])
  end
  if until_ms > 0 then
    redis.call('HSET', K.suspended, node, tostring(until_ms))
    stat(K, 'node:' .. node .. ':suspensions')
    emit(K, 'node_suspended', '', { 'node', node, 'until_ms', tostring(until_ms), 'reason', reason })
  else
    redis.call('HDEL', K.suspended, node)
    emit(K, 'node_resumed', '', { 'node', node, 'reason', reason })
  end
  return 'ok'
end

register('fleetq_node_beat', node_beat, DRAIN)
register('fleetq_node_state', node_state, DRAIN)
register('fleetq_node_gone', node_gone, DRAIN)
