-- eligible.lua: which nodes are alive and may run a job — the nodes zset (last seen), operator
-- and self suspensions, workflow blocks after a failure, and the job's own avoid list.

-- A node is alive while it was seen (fleetq_take, fleetq_renew, fleetq_reclaim) this recently;
-- a busy worker renews every lease/3, a watcher reclaims at least once a lease, and any other
-- idle worker is entered until its next call (fleetq_reclaim's seen_until).
local NODE_ALIVE_MS = 30000

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
