-- position.lua: a waiting job's place in line, in O(1), from the `workers` group's counters
-- (XINFO GROUPS, and XLEN when Redis cannot tell the lag), never by reading entries.
--
-- The counters (Redis >= 7.0): the stream's entries-added counts every XADD ever; the
-- group's entries-read is the entries-added value of the last entry it delivered, and its lag
-- is entries-added - entries-read. Each entry added by a function carries `seq`, the
-- entries-added value it got, so its position is seq - entries-read: the entries added after
-- the last delivered one, up to and including it. Redis keeps entries-read exact while no
-- entry beyond the group's last-delivered id is deleted: fleetq deletes only delivered
-- entries (finished ones are XACKed and XDELed) and leaves cancelled and expired waiting
-- entries in the stream marked, as tombstones, precisely for this.
--
-- What Redis cannot tell, and what fleetq does then:
-- - lag is nil when the last delivered entry was deleted while an earlier one is still
--   pending (a long job ahead of short ones that finished). The undelivered entries are then
--   XLEN - pending: every entry still in the stream is pending or undelivered, since fleetq
--   acknowledges and deletes together.
-- - entries-read is nil for a group made without ENTRIESREAD (XGROUP CREATE … 0 MKSTREAM, as
--   workers and tests do) until its first delivery, when Redis estimates it. The end of the
--   line is known then (lag, XLEN) but not entries-added, so entries added meanwhile get no
--   `seq` and their later positions are counted (below). fleetq_enqueue makes the group
--   itself, with its counter, when the queue has none (make_group).
-- - Plain-XADD entries carry no `seq`: their position is counted with XRANGE from the group's
--   last-delivered id, up to POSITION_SCAN_LIMIT entries. Only fleetq_status pays for that,
--   when asked.

local POSITION_SCAN_LIMIT = 1000

-- The `workers` group: { last = last-delivered-id, read = entries-read or nil, lag = lag or
-- nil, pending = count }, or nil; and whether the stream exists.
local function group_of(K)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', K.stream)
  if not ok then return nil, false end
  for _, g in ipairs(groups) do
    local m = to_map(g)
    if m['name'] == GROUP then
      return { last = m['last-delivered-id'], read = tonumber(m['entries-read']), lag = tonumber(m['lag']),
        pending = tonumber(m['pending']) or 0 }, true
    end
  end
  return nil, true
end

-- Makes the `workers` group of a stream that has none, reading from the start, with its
-- entries-read counter when Redis can tell it (so positions are O(1) from the first job on).
-- A stream that does not exist yet has added nothing: the counter is 0 and nothing is read.
-- An existing one (plain XADDs before any worker) is read once with XINFO STREAM: the
-- counter before its first entry is entries-added - length, exact when no entry after the
-- first was deleted. Returns the group as group_of does.
local function make_group(K, exists)
  if not exists then
    redis.call('XGROUP', 'CREATE', K.stream, GROUP, '0', 'MKSTREAM', 'ENTRIESREAD', '0')
    return { last = '0-0', read = 0, lag = 0, pending = 0 }
  end
  local info = to_map(redis.call('XINFO', 'STREAM', K.stream))
  local added, length = tonumber(info['entries-added']), tonumber(info['length']) or 0
  local first, deleted = info['first-entry'], info['max-deleted-entry-id']
  local clean = deleted == '0-0' or not first or id_lt(deleted, first[1])
  if added and clean then
    redis.call('XGROUP', 'CREATE', K.stream, GROUP, '0', 'ENTRIESREAD', tostring(added - length))
    return { last = '0-0', read = added - length, lag = length, pending = 0 }
  end
  redis.call('XGROUP', 'CREATE', K.stream, GROUP, '0')
  return { last = '0-0', read = nil, lag = nil, pending = 0 }
end

-- The end of the line, from the group as group_of read it (and whether the stream exists),
-- moved on by each add (add_entry): { group = the group or nil, added = the stream's
-- entries-added or nil when Redis cannot tell it, behind = undelivered entries }.
local function line_from(K, g, exists)
  if not exists then
    -- No stream: nothing was ever added (a new stream's counter starts at 0).
    return { group = nil, added = 0, behind = 0 }
  end
  if g == nil then
    -- A stream without a group: nothing was delivered.
    return { group = nil, added = nil, behind = redis.call('XLEN', K.stream) }
  end
  local behind = g.lag
  if behind == nil then behind = math.max(redis.call('XLEN', K.stream) - g.pending, 0) end
  local added = nil
  if g.read then added = g.read + behind end
  return { group = g, added = added, behind = behind }
end

-- The end of the line now (line_from), read once per call by the functions that add entries.
local function line_of(K)
  return line_from(K, group_of(K))
end

-- 1-based position of a waiting entry (how many undelivered entries are at or before it),
-- or 0 when the entry has already been delivered to a worker. `g` is the group as group_of
-- reads it, when the caller has it (read here otherwise).
local function position_of(K, entry_id, seq, g)
  -- A `seq` that is not a number of its range (a plain XADD may carry anything) is ignored.
  if type(seq) == 'string' then seq = whole(seq, ENTRY_NUMBERS.seq) end
  if g == nil then g = group_of(K) end
  local from = '-'
  if g ~= nil then
    if not id_lt(g.last, entry_id) then return 0 end
    if seq and g.read and seq > g.read then return seq - g.read end
    from = '(' .. g.last
  end
  local r = redis.call('XRANGE', K.stream, from, entry_id, 'COUNT', POSITION_SCAN_LIMIT)
  if #r > 0 and r[#r][1] == entry_id then return #r end
  return POSITION_SCAN_LIMIT + 1
end
