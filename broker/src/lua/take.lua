-- fleetq_take: a worker took entries (XREADGROUP or reclaim); decide for each whether it runs.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  node name of the caller
-- ARGV[3]  lease in ms (the entry is reclaimable when not renewed within it)
-- ARGV[4]  1 when the job counts as started at once (in-process handlers); 0 when the
--          executor reports the start itself (fleetq_progress … started)
-- ARGV[5…] per entry, 10 values: entry_id, job_id, prior_attempts, max_attempts,
--          queue_deadline_ms (0 = none), enqueued_ms, avoid (comma-separated nodes or ''),
--          avoid_until_ms (0 = none), workflow (or ''), passes (times handed on so far)
-- Reply    per entry { entry_id, decision, deliveries, attempts }, decision one of
--          run        the caller owns it and runs it;
--          lost       not owned by the caller;
--          duplicate  another entry already carries this job id, or the job has ended;
--          cancelled  a producer cancelled it;
--          expired    its queue timeout passed before it started;
--          dead       attempts exhausted (the last holders lost their leases);
--          pass       the caller's node is avoided for this job (it failed it, or the job's
--                     workflow, within failover_cooldown_ms) and another eligible node is
--                     alive: the job goes back in line, shortly, without using an attempt
--                     (the reply's last value is then the delay in ms before it is due).

local PASS_DELAY_MS = 250
local PASS_DELAY_MAX_MS = 5000

local function take(keys, args)
  local K = queue_keys(keys[1])
  local consumer, node = args[1], args[2]
  local lease = tonumber(args[3])
  local started_now = args[4] == '1'
  local now = now_ms()
  seen(K, node)
  local out = {}
  for i = 5, #args, 10 do
    local entry_id, job_id = args[i], args[i + 1]
    local prior, max_attempts = tonumber(args[i + 2]), tonumber(args[i + 3])
    local deadline, enqueued = tonumber(args[i + 4]), args[i + 5]
    local avoid, avoid_until = split_csv(args[i + 6]), tonumber(args[i + 7]) or 0
    local workflow, passes = args[i + 8] or '', tonumber(args[i + 9]) or 0
    local owner, deliveries = pending_owner(K, entry_id)
    local jk = job_key(K, job_id)
    if owner ~= consumer then
      out[#out + 1] = { entry_id, 'lost', deliveries, 0 }
    else
      local h = redis.call('HMGET', jk, 'state', 'entry', 'cancel', 'nodes', 'started_ms', 'tombstone')
      local state, known_entry, cancel, nodes, started = h[1], h[2], h[3], h[4] or '', h[5]
      local attempts = prior + deliveries
      local avoided = (avoid_until > now and contains(avoid, node))
      if not avoided and workflow ~= '' then
        local blocked = tonumber(redis.call('HGET', K.blocks, block_field(workflow, node)))
        avoided = blocked ~= nil and blocked > now
      end
      if (known_entry and known_entry ~= entry_id) or TERMINAL[state] then
        drop_entry(K, entry_id)
        if h[6] == '1' and known_entry == entry_id then
          -- A cancelled or expired waiting entry, reached at last: its hash may expire now.
          stat(K, 'tombstones', -1)
          redis.call('HDEL', jk, 'tombstone')
          local retention = config_num(K, 'retention_ms', DEFAULT_RETENTION_MS)
          if retention <= 0 then retention = DEFAULT_RETENTION_MS end
          redis.call('PEXPIRE', jk, retention)
        else
          stat(K, 'duplicates')
        end
        out[#out + 1] = { entry_id, 'duplicate', deliveries, attempts }
      elseif cancel == '1' then
        drop_entry(K, entry_id)
        finish(K, job_id, 'cancelled')
        emit(K, 'cancelled', job_id)
        out[#out + 1] = { entry_id, 'cancelled', deliveries, attempts }
      elseif deadline > 0 and now > deadline and not started then
        drop_entry(K, entry_id)
        local enq = tonumber(enqueued) or now
        end_expired(K, job_id, enq, deadline - enq)
        out[#out + 1] = { entry_id, 'expired', deliveries, attempts }
      elseif attempts > max_attempts then
        end_exhausted(K, job_id, entry_id, entry_fields(K, entry_id), attempts - 1, max_attempts, nodes)
        out[#out + 1] = { entry_id, 'dead', deliveries, attempts }
      elseif avoided and deliveries == 1
        and other_node_eligible(K, node, avoid_until > now and avoid or {}, workflow, now) then
        local delay = math.min(PASS_DELAY_MS * 2 ^ passes, PASS_DELAY_MAX_MS)
        requeue(K, job_id, entry_id, { passes = tostring(passes + 1) }, delay, now)
        stat(K, 'passed')
        out[#out + 1] = { entry_id, 'pass', deliveries, delay }
      else
        if nodes ~= '' then nodes = nodes .. ',' end
        nodes = nodes .. node
        local st = started_now and 'running' or 'taken'
        local set = { 'HSET', jk, 'state', st, 'entry', entry_id, 'consumer', consumer, 'node', node,
          'attempts', tostring(attempts), 'max_attempts', tostring(max_attempts), 'taken_ms', tostring(now),
          'nodes', nodes, 'enqueued_ms', enqueued, 'deliveries', tostring(deliveries) }
        if started_now then
          set[#set + 1] = 'attempt_started_ms'
          set[#set + 1] = tostring(now)
          if not started then
            set[#set + 1] = 'started_ms'
            set[#set + 1] = tostring(now)
          end
        end
        redis.call(unpack(set))
        if attempts > 1 or state then
          -- An earlier attempt's progress and timeout do not describe this one.
          redis.call('HDEL', jk, 'progress', 'progress_ms', 'stages', 'timeout', 'timeout_stage',
            'timeout_elapsed_ms', 'timeout_node')
          if not started_now then redis.call('HDEL', jk, 'attempt_started_ms') end
          redis.call('PERSIST', jk)
        end
        redis.call('ZADD', K.leases, now + lease, entry_id)
        emit(K, started_now and 'started' or 'taken', job_id, { 'node', node, 'attempt', tostring(attempts) })
        out[#out + 1] = { entry_id, 'run', deliveries, attempts }
      end
    end
  end
  return out
end

register('fleetq_take', take)
