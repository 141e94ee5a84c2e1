-- base.lua: what every fleetq function stands on — the queue's key names, the per-call caches of
-- the server's time and the queue config, the rule for numbers, and small table helpers.
-- Prepended to the library.
--
-- Key layout: every function takes the queue's stream key `fleetq:{q}:stream` as KEYS[1]
-- and derives the queue's other keys from it (they share the `{q}` hash tag, so they live
-- in the same Redis Cluster slot). The table of keys is in broker/src/keys.rs and
-- docs/protocol.md; the suffixes below must match it.

local GROUP = 'workers'

local DEFAULT_RETENTION_MS = 3600000
local DEFAULT_EVENTS_MAXLEN = 10000
local DEFAULT_LEASE_MS = 10000
-- A node that failed a job (or its workflow) is avoided for it this long.
local DEFAULT_FAILOVER_COOLDOWN_MS = 60000
-- A job that failed on this many distinct nodes is poison.
local DEFAULT_POISON_NODES = 3

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

-- Registers a fleetq function; every call starts with empty per-call caches. `flags` as
-- for redis.register_function (e.g. { 'no-writes' }, { 'allow-oom' }).
local function register(name, fn, flags)
  redis.register_function{ function_name = name, flags = flags, callback = function(keys, args)
    call_now = nil
    call_config = nil
    return fn(keys, args)
  end }
end

-- Flags of the functions that drain work or keep it alive (take, renew, progress, complete,
-- reclaim, promote, expire, node records, a producer's wait): they may run at maxmemory, because each of them
-- frees memory or writes a few bytes to let running work finish. Only enqueue and dead-letter
-- retry, which add jobs, are refused when Redis is full.
local DRAIN = { 'allow-oom' }

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
    holds = p .. 'holds',
    deadlines = p .. 'deadlines',
  }
end

local function job_key(K, job_id) return K.prefix .. 'job:' .. job_id end
local function notify_key(K, job_id) return K.prefix .. 'notify:' .. job_id end

-- A flat field/value array as a table; of two equal fields the first counts (as in Rust).
local function to_map(flat)
  local m = {}
  for i = 1, #flat, 2 do
    if m[flat[i]] == nil then m[flat[i]] = flat[i + 1] end
  end
  return m
end

local TERMINAL = { succeeded = true, failed = true, dead = true, expired = true, cancelled = true }

-- Numbers: one rule with Rust (broker/src/limits.rs writes these tables in). A number is 1 to
-- MAX_DIGITS decimal digits and nothing else (no sign, space, point, exponent, 0x, nan, inf),
-- within its field's { min, max }. Lua's tonumber alone would take all of those.
local ENTRY_NUMBERS = __FLEETQ_ENTRY_NUMBERS__
local CONFIG_NUMBERS = __FLEETQ_CONFIG_NUMBERS__
-- The config fields in the order Rust checks them (so both name the same bad one first).
local CONFIG_ORDER = __FLEETQ_CONFIG_ORDER__
local MAX_DIGITS = __FLEETQ_MAX_DIGITS__
-- Most fields an entry may carry; the functions add none with more.
local ENTRY_FIELDS_MAX = __FLEETQ_ENTRY_FIELDS_MAX__

-- Any duration in ms a caller passes (elapsed, delays): 0 to the longest a field may hold.
local MS_RANGE = { 0, ENTRY_NUMBERS.delay_ms[2] }

-- The number `s` holds by the rule, within `range`; nil otherwise.
local function whole(s, range)
  -- The commonest value, without a pattern match.
  if s == '0' then
    if range[1] <= 0 then return 0 end
    return nil
  end
  if type(s) ~= 'string' or #s == 0 or #s > MAX_DIGITS or not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n < range[1] or n > range[2] then return nil end
  return n
end

-- An entry field's number: `default` when absent, nil when present but not a number of its
-- range (the worker dead-letters such an entry as malformed).
local function entry_num(m, name, default)
  local v = m[name]
  if v == nil then return default end
  return whole(v, ENTRY_NUMBERS[name])
end

-- A value as shown in a message: at most 100 bytes, control bytes as '?'.
local function shown(v)
  return '"' .. string.gsub(string.sub(tostring(v), 1, 100), '%c', '?') .. '"'
end

-- The config last checked: its key, its HGETALL reply and what the checks made of it. A call
-- that reads the same reply (nearly every call) skips the checks, which it would pass again.
-- Kept between calls by the library (lost with it, and then only read again).
local checked_key, checked_flat, checked_nums = nil, nil, nil

-- Whether two HGETALL replies are the same, value for value.
local function same_flat(a, b)
  if b == nil or #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

-- Reads and checks the queue's config hash, once per call; returns K. Every function that
-- uses the config calls it first, so a bad value fails the call before anything is written:
-- the same values Rust refuses (QueueConfig::from_map), with the field, value and range.
local function open_queue(K)
  if call_config ~= nil and call_config.key == K.config then return K end
  local flat = redis.call('HGETALL', K.config)
  if checked_key == K.config and same_flat(flat, checked_flat) then
    call_config = { key = K.config, nums = checked_nums }
    return K
  end
  local m = to_map(flat)
  local nums = {}
  for _, name in ipairs(CONFIG_ORDER) do
    local range, v = CONFIG_NUMBERS[name], m[name]
    if v ~= nil then
      nums[name] = whole(v, range)
      if nums[name] == nil then
        return error(redis.error_reply('fleetq: queue config field ' .. name .. ' must be a whole number from ' .. range[1] ..
          ' to ' .. range[2] .. ' (decimal digits only), got ' .. shown(v) .. '; fix it with HSET ' ..
          K.config .. ' ' .. name .. ' <number>'))
      end
    end
  end
  local base, max = nums['backoff_base_ms'] or 0, nums['backoff_max_ms'] or 0
  if base == 0 then base = 1000 end
  if max == 0 then max = 60000 end
  if max < base then
    return error(redis.error_reply('fleetq: queue config field backoff_max_ms is below backoff_base_ms (' .. max ..
      ' < ' .. base .. '); raise it with HSET ' .. K.config .. ' backoff_max_ms <number>'))
  end
  call_config = { key = K.config, nums = nums }
  checked_key, checked_flat, checked_nums = K.config, flat, nums
  return K
end

-- A number from the queue's config (checked by open_queue at the top of the call), or
-- `default` when the field is absent.
local function config_num(K, name, default)
  if call_config == nil or call_config.key ~= K.config then
    return error('fleetq: internal: the queue config of ' .. K.config .. ' was not read at the top of this call')
  end
  local v = call_config.nums[name]
  if v == nil then return default end
  return v
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

local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am == nil or bm == nil then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
