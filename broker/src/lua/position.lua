-- position.lua: a waiting job's place in line, in O(1) from the entry's `seq` (the stream's
-- entries-added counter when it was added) and the group's entries-read counter.

-- Plain-XADD jobs carry no `seq` field; their position is counted with XRANGE up to this.
local POSITION_SCAN_LIMIT = 1000

local function group_state(K)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', K.stream)
  if not ok then return nil end
  for _, g in ipairs(groups) do
    local m = to_map(g)
    if m['name'] == GROUP then return m end
  end
  return nil
end


-- 1-based position of a waiting entry (how many undelivered entries are at or before it),
-- or 0 when the entry has already been delivered to a worker.
local function position_of(K, entry_id, seq)
  -- A `seq` that is not a number of its range (a plain XADD may carry anything) is ignored.
  if type(seq) == 'string' then seq = whole(seq, ENTRY_NUMBERS.seq) end
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
