-- record.lua: the job record (`fleetq:{q}:job:<id>`) and the entry it was read from: its
-- fields, its terminal state (with waiters woken and the retention clock started) and its
-- attempt history.

-- Attempt records kept per job.
local HISTORY_MAX = 20

-- The fields of one stream entry as a flat array, or nil when the entry is gone.
local function entry_fields(K, entry_id)
  local r = redis.call('XRANGE', K.stream, entry_id, entry_id)
  if #r == 0 then return nil end
  return r[1][2]
end

-- Is `s` UTF-8, as Rust's str::from_utf8 decides (no overlong forms, surrogates or values
-- past U+10FFFF)?
local function is_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    elseif c >= 0x80 then return false end
    if i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local b = string.byte(s, j)
      if b < lo or b > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end

-- The job id of an entry, as the worker reads it (RawEntry::job_id): its first `id` field
-- when that is 1 to 200 bytes of UTF-8, else the entry id itself.
local function job_id_of(entry_id, fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      local v = fields[i + 1]
      if #v >= 1 and #v <= 200 and is_utf8(v) then return v end
      return entry_id
    end
  end
  return entry_id
end

-- How long an ended job's hash is kept.
local function retention_ms(K)
  local retention = config_num(K, 'retention_ms', DEFAULT_RETENTION_MS)
  if retention <= 0 then retention = DEFAULT_RETENTION_MS end
  return retention
end

-- Wakes the `n` callers waiting on a job that ended as `state` (fleetq_watch counted them in
-- the holds hash): one value each in its notify list, which they block on.
local function wake_waiters(K, job_id, state, n)
  local nk = notify_key(K, job_id)
  local args = { 'RPUSH', nk }
  for _ = 1, n do args[#args + 1] = state end
  redis.call(unpack(args))
  redis.call('PEXPIRE', nk, 60000)
end

-- End a job: set its terminal state, wake its waiters, start its retention clock. Returns
-- true when someone was waiting on it (its routine events are then written too).
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
  local wf = 'w:' .. job_id
  local waiters = tonumber(redis.call('HGET', K.holds, wf)) or 0
  if waiters > 0 then
    wake_waiters(K, job_id, state, waiters)
    redis.call('HDEL', K.holds, wf)
  end
  redis.call('PEXPIRE', jk, retention_ms(K))
  stat(K, state)
  return waiters > 0
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
