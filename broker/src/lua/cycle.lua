-- fleetq_take_next: a busy worker's whole turn in one call — record the attempts that just
-- ended (first-attempt successes, as fleetq_complete_first records them), and read new
-- entries for its free slots and take them (as XREADGROUP … > and fleetq_take_fresh would).
-- One round trip instead of three, and no ownership lookup: the entries were read here, by
-- the caller, for the first time.
--
-- KEYS[1]  queue stream key
-- ARGV[1…7] as fleetq_take_fresh's: consumer, node, lease_ms, started_now, beat,
--          max_attempts and queue_timeout_ms of the queue
-- ARGV[8]  E: how many ends follow
-- ARGV[9…8+4E] per end, as fleetq_complete_first's 4 values: entry id, token, job id, result
-- ARGV[9+4E…] one token per entry to read (16 hex digits each): at most that many entries
--          are read, with `>` (none when no token is given: the ends only)
-- Reply    { ends, taken, read_error }:
--          ends        per end, in order, 'ok' or 'fenced' (as fleetq_complete_first's);
--          taken       per entry read, in stream order, { entry_id, decision, deliveries, n,
--                      fields }: decision and n as fleetq_take's, deliveries 1, fields the
--                      entry's flat field/value list; decision 'read' when the entry carries
--                      a field that fleetq_take must be told (see NOT_FRESH): it is delivered
--                      to the caller but not taken — the caller passes it to fleetq_take with
--                      a token of its own (the one given here is not used);
--          read_error  '' or why the read failed (a NOGROUP error when the group is gone);
--                      the ends are recorded either way.
--
-- Which token went to which entry: the tokens are used in order, one per entry read.
-- Entries are taken by fleetq_take's rules (marks in the holds hash, queue deadline,
-- attempts), so a cancelled or expired job read here is settled, not run. Whatever an entry
-- holds besides those fields (a payload that is not JSON, say) is the worker's to judge: it
-- dead-letters a malformed entry it was given to run, fenced by the token.

local NEXT_HEADER = 8
-- Fields that make fleetq_take's values for an entry differ from what an entry id and the
-- queue config say.
local NOT_FRESH = { id = true, attempts = true, max_attempts = true, queue_timeout_ms = true,
  enqueued_ms = true, avoid = true, avoid_until = true, workflow = true, passes = true }

-- Whether an entry's flat field list names none of NOT_FRESH.
local function fresh_fields(fields)
  for i = 1, #fields, 2 do
    if NOT_FRESH[fields[i]] then return false end
  end
  return true
end

local function take_next(keys, args)
  local K = open_queue(queue_keys(keys[1]))
  local ends = whole(args[NEXT_HEADER], { 0, 100000 })
  if #args < NEXT_HEADER or ends == nil or #args < NEXT_HEADER + 4 * ends then
    return redis.error_reply('fleetq: fleetq_take_next takes ' .. NEXT_HEADER .. ' values, 4 per end and ' ..
      'then 1 token per entry to read; got ' .. #args .. ' (a worker of another protocol version?)')
  end
  local T, bad = fresh_header(K, args)
  if T == nil then return redis.error_reply('fleetq: fleetq_take_next: ' .. bad) end
  local tokens_from = NEXT_HEADER + 4 * ends + 1
  for i = tokens_from, #args do
    if not string.match(args[i], TOKEN_PATTERN) then
      return redis.error_reply('fleetq: fleetq_take_next: token ' .. shown(args[i]) .. ' is not 16 hex digits')
    end
  end
  local ended = first_entries(args, NEXT_HEADER + 1, tokens_from - 1)

  -- The read first: one read of the holds hash then serves both the ends (their tokens and
  -- waiters) and what came (marks of jobs cancelled or expired while waiting). The entries
  -- read are new, so none of them is among the ends.
  local count = #args - tokens_from + 1
  local read_error = ''
  local read = false
  if count > 0 then
    local ok, r = pcall(redis.call, 'XREADGROUP', 'GROUP', GROUP, T.consumer, 'COUNT', count, 'STREAMS', K.stream, '>')
    if ok then read = r else read_error = r.err or tostring(r) end
  end
  local got = read and read[1][2] or {}
  local wanted = holds_wanted(ended, {})
  local marks_from = #wanted
  for _, entry in ipairs(got) do wanted[#wanted + 1] = entry[1] end
  local h = {}
  if #wanted > 0 then h = redis.call('HMGET', K.holds, unpack(wanted)) end
  local done = complete_batch(K, T.consumer, T.node, ended, h)

  -- taken[i] is the i-th entry read: taken here (take_plain) when it is a plain first delivery
  -- with no mark and its queue deadline not passed; 'read' when fleetq_take must be told its
  -- fields; else decided by take_batch. take_batch also notes the caller alive (beat) and
  -- writes the leases and tokens of all that run.
  local taken = {}
  local entries, ids, owned, at = {}, {}, {}, {}
  for i, entry in ipairs(got) do
    local id, fields = entry[1], entry[2]
    local ms = string.match(id, '^(%d+)%-%d+$')
    local token = args[tokens_from + i - 1]
    taken[i] = { id, 'read', 1, 0, fields }
    if ms ~= nil and fresh_fields(fields) then
      local mark = h[marks_from + i]
      if mark == false and (T.queue_timeout == 0 or T.now <= tonumber(ms) + T.queue_timeout) then
        taken[i][2], taken[i][4] = 'run', take_plain(K, T, id, token, ms, T.max_attempts_s)
      else
        entries[#entries + 1] = fresh_entry(T, id, token, ms)
        ids[#ids + 1] = id
        owned[id] = 1
        at[#at + 1] = i
      end
    end
  end
  for j, t in ipairs(take_batch(K, T, entries, ids, args[5] == '1', owned)) do
    local row = taken[at[j]]
    row[2], row[3], row[4] = t[2], t[3], t[4]
  end
  return { done, taken, read_error }
end

register('fleetq_take_next', take_next, DRAIN)
