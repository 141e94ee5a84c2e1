-- base.lua: what every fleetq function stands on — the queue's key names, the per-call caches of
-- the server's time and the queue config, and small table helpers. Prepended to the library.
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
