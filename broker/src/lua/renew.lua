-- fleetq_renew: extend the lease of every entry a worker holds, in one call.
--
-- KEYS[1]  queue stream key
-- ARGV[1]  consumer name of the caller
-- ARGV[2]  lease in ms
-- ARGV[3]  node name of the caller (marks the node alive)
-- ARGV[4…] per entry, 3 values: entry_id, token (the caller's, from its fleetq_take), job_id
-- Reply    per entry: 'ok' (renewed), 'lost' (another consumer or take holds it now; the
--          caller must stop: it cannot commit), or 'cancel' (renewed, but a producer asked to
--          cancel the job; the caller should stop it and commit 'cancelled').
--
-- The ownership check comes first: a bare XCLAIM … JUSTID would silently take back an entry
-- another host has already reclaimed.

local function renew(keys, args)
  local K = queue_keys(keys[1])
  local consumer, lease = args[1], whole(args[2], CONFIG_NUMBERS.lease_ms)
  if lease == nil then
    return redis.error_reply('fleetq: fleetq_renew: lease ' .. shown(args[2]) .. ' is not a whole number from ' ..
      CONFIG_NUMBERS.lease_ms[1] .. ' to ' .. CONFIG_NUMBERS.lease_ms[2] .. ' ms')
  end
  local now = now_ms()
  seen(K, args[3])
  worker_called(K, lease, now)
  local out = {}
  for i = 4, #args, 3 do
    local entry_id, token, job_id = args[i], args[i + 1], args[i + 2]
    local jk = job_key(K, job_id)
    if owns(K, entry_id, consumer, token) then
      redis.call('XCLAIM', K.stream, GROUP, consumer, 0, entry_id, 'JUSTID')
      set_lease(K, entry_id, now + lease)
      if redis.call('HGET', jk, 'cancel') == '1' then
        out[#out + 1] = 'cancel'
      else
        out[#out + 1] = 'ok'
      end
    else
      out[#out + 1] = 'lost'
    end
  end
  return out
end

register('fleetq_renew', renew, DRAIN)
