"""The Lua scripts of the Redis queue (`queue.py`, whose docstring describes the keys and the protocol).

Every state change is one script, so it is atomic and works alike on Redis 6.2 and 7.x. ARGV[1] of every
script is the key namespace (`pd:<name>:`), bound to `NS` by the shared prelude.
"""

from __future__ import annotations

# Shared helpers, prepended to every script (see SCRIPTS). Times are Redis' own clock (ms), so workers on several machines
# agree on visibility deadlines.
_LUA_PRELUDE = """
local NS = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function activate(job)
  -- A job joins the round-robin behind those already waiting, with an order of its own: jobs that join with
  -- equal scores would be served by name (ZSET ties), favouring "job-0" over "job-9" on every round.
  if not redis.call('ZSCORE', NS .. 'jobs', job) then
    redis.call('ZADD', NS .. 'jobs', redis.call('INCR', NS .. 'seq'), job)
  end
end
local function ring()
  redis.call('LPUSH', NS .. 'bell', '1')
  redis.call('LTRIM', NS .. 'bell', 0, 63)
end
local function give_up(rid, reply, attempts, last_error, ttl_ms)
  -- Fails a request for good: an INTERNAL error envelope (see queue.encode_err) naming its last error.
  local msg = 'request failed after ' .. attempts .. ' attempts; last error: ' .. (last_error or 'unknown')
  redis.call('RPUSH', reply, rid .. '\\nerr\\nINTERNAL\\t\\t' .. msg)
  redis.call('PEXPIRE', reply, ttl_ms)
  redis.call('DEL', NS .. 'req:' .. rid)
end
"""

# ARGV: namespace, rid, payload, job, tokens, reply, deadline_ms, max_pending, hash_ttl_ms, completion tokens,
# prompt key (hex; batch_cost.prompt_key), tenant (the caller's token; '' for none: the job is its own tenant),
# weight (the tenant's claims per round; absent from an older front-end: 1)
_ENQUEUE = """
local rid, job = ARGV[2], ARGV[4]
local q = NS .. 'q:' .. job
if redis.call('LLEN', q) >= tonumber(ARGV[8]) then return 0 end
local key = NS .. 'req:' .. rid
redis.call('HSET', key, 'payload', ARGV[3], 'job', job, 'tokens', ARGV[5], 'reply', ARGV[6],
           'deadline', ARGV[7], 'attempts', 0, 'enq', now_ms(), 'ctok', ARGV[10], 'pkey', ARGV[11],
           'tenant', ARGV[12] or '', 'weight', ARGV[13] or 1)
redis.call('PEXPIRE', key, tonumber(ARGV[9]))
redis.call('RPUSH', q, rid)
activate(job)
ring()
return 1
"""

# ARGV: namespace, budget_tokens, max_n, visibility_ms, max_tries, reply_ttl_ms, reuse ('1': the worker computes a
# prompt once per batch). The budget is batch_cost.BatchCost's, mirrored here; a request queued without 'ctok' and
# 'pkey' (an older front-end) counts as one with a prompt of its own.
# Returns a flat list: rid, payload, attempts, reply, deadline, waited_ms, ... for each claimed request.
_CLAIM = """
local budget, max_n, vis = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_tries, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local reuse = ARGV[7] == '1'
local now = now_ms()
-- 1. Reclaim leases that expired (their worker died or stalled): back to the head of their job's queue.
local expired = redis.call('ZRANGEBYSCORE', NS .. 'inflight', '-inf', now, 'LIMIT', 0, 1000)
for _, rid in ipairs(expired) do
  redis.call('ZREM', NS .. 'inflight', rid)
  local key = NS .. 'req:' .. rid
  local job = redis.call('HGET', key, 'job')
  if job then
    redis.call('HSET', key, 'last_error', 'the worker holding it stopped responding (lease expired)')
    redis.call('LPUSH', NS .. 'q:' .. job, rid)
    activate(job)
  end
end
-- 2. Round-robin across tenants, then across each tenant's jobs: `weight` requests per tenant per round (1 unless
-- its token says otherwise), each from the tenant's next job in the ring, so that a tenant's share follows its
-- weight, not its number of job ids. A round is one or more passes over the tenants: in each pass every tenant
-- still under its weight takes one request. A request's tenant is the token that queued it (its job when none was
-- given); a job counts as the tenant of its first request. The ring is read once per claim (the tenants and their
-- jobs in ring order), so a claim costs the jobs once plus its requests, not the jobs once per request: a tenant
-- with 200 job ids made each round walk all of them. A job that gave a request goes to the back of the ring (a new
-- order from `seq`), so the next claim starts with the jobs and tenants that waited. Within the token budget: the
-- fresh requests (the first of each prompt; all of them without reuse) cost their count x the longest of them,
-- the others their completion tokens.
local out, n, full = {}, 0, false
local fresh, longest, packed, prompts = 0, 0, 0, {}
local tenants, of = {}, {}  -- tenants in ring order; tenant -> {weight, jobs (ring order), next job}
for _, job in ipairs(redis.call('ZRANGE', NS .. 'jobs', 0, -1)) do
  local q = NS .. 'q:' .. job
  local rid, h = redis.call('LINDEX', q, 0), nil
  while rid do
    h = redis.call('HMGET', NS .. 'req:' .. rid, 'job', 'tenant', 'weight')
    if h[1] then break end
    redis.call('LPOP', q)  -- its hash expired or was withdrawn: nobody waits for it any more
    rid = redis.call('LINDEX', q, 0)
  end
  if not rid then
    redis.call('ZREM', NS .. 'jobs', job)
  else
    local tenant = (h[2] and h[2] ~= '') and h[2] or job
    local t = of[tenant]
    if not t then
      t = {weight = tonumber(h[3]) or 1, jobs = {}, at = 1}
      of[tenant] = t
      table.insert(tenants, tenant)
    end
    table.insert(t.jobs, job)
  end
end

-- One request from job `job` into the batch: 'taken', 'empty' (nothing live left in it) or 'full' (the budget).
-- Heads whose hash expired or was withdrawn, or whose deadline passed, are dropped on the way.
local function take(job)
  local q = NS .. 'q:' .. job
  while true do
    local rid = redis.call('LINDEX', q, 0)
    if not rid then
      redis.call('ZREM', NS .. 'jobs', job)
      return 'empty'
    end
    local key = NS .. 'req:' .. rid
    local h = redis.call('HMGET', key, 'payload', 'tokens', 'reply', 'deadline', 'attempts', 'last_error', 'enq',
                         'ctok', 'pkey')
    if not h[1] then
      redis.call('LPOP', q)  -- its hash expired or was withdrawn: nobody waits for it any more
    elseif tonumber(h[4]) > 0 and tonumber(h[4]) < now then
      redis.call('LPOP', q)  -- its deadline passed in the queue: dropped before any forward pass
      redis.call('DEL', key)
      redis.call('HINCRBY', NS .. 'stats', 'expired', 1)
    else
      local tok = tonumber(h[2])
      local ctok, pkey = tonumber(h[8] or h[2]), h[9]
      local shares = reuse and pkey and pkey ~= '' and prompts[pkey]
      local cost
      if shares then
        cost = fresh * longest + packed + ctok
      else
        cost = (fresh + 1) * math.max(longest, tok) + packed
      end
      if n > 0 and cost > budget then return 'full' end
      redis.call('LPOP', q)
      local attempts = tonumber(h[5]) + 1
      if attempts > max_tries then
        give_up(rid, h[3], max_tries, h[6], ttl)
      else
        redis.call('HSET', key, 'attempts', attempts)
        redis.call('ZADD', NS .. 'inflight', now + vis, rid)
        table.insert(out, rid)
        table.insert(out, h[1])
        table.insert(out, attempts)
        table.insert(out, h[3])
        table.insert(out, h[4])
        table.insert(out, now - tonumber(h[7] or now))
        n = n + 1
        if shares then
          packed = packed + ctok
        else
          fresh, longest = fresh + 1, math.max(longest, tok)
          if pkey and pkey ~= '' then prompts[pkey] = true end
        end
      end
      redis.call('ZADD', NS .. 'jobs', redis.call('INCR', NS .. 'seq'), job)
      if redis.call('LLEN', q) == 0 then
        redis.call('ZREM', NS .. 'jobs', job)
        return 'taken', true
      end
      return 'taken', false
    end
  end
end

-- One turn of tenant `t`: a request from its next job that has one. False when it has none left.
local function turn(t)
  while #t.jobs > 0 do
    if t.at > #t.jobs then t.at = 1 end
    local job = t.jobs[t.at]
    local got, emptied = take(job)
    if got == 'full' then
      full = true
      return true
    end
    if got == 'empty' or emptied then
      table.remove(t.jobs, t.at)  -- the next job slides into this place
    else
      t.at = t.at + 1
    end
    if got == 'taken' then return true end
  end
  return false
end

while n < max_n and not full and #tenants > 0 do
  local served, active = {}, {}
  for _, tenant in ipairs(tenants) do served[tenant] = 0 end
  local again = true
  while again and n < max_n and not full do
    again = false
    for _, tenant in ipairs(tenants) do
      if n >= max_n or full then break end
      local t = of[tenant]
      if served[tenant] < t.weight and #t.jobs > 0 then
        if turn(t) and not full then
          served[tenant] = served[tenant] + 1
          if served[tenant] < t.weight then again = true end
        end
      end
    end
  end
  for _, tenant in ipairs(tenants) do
    if #of[tenant].jobs > 0 then table.insert(active, tenant) end
  end
  tenants = active
end
return out
"""

# ARGV: namespace, rid, reply, envelope, reply_ttl_ms, body key ('' unless the envelope is a reference to one).
# Returns 1 if this answer was delivered, 0 if the request had already been answered (a duplicate from a
# reclaimed lease) or had expired; then its body key, if any, is deleted.
_COMPLETE = """
local rid = ARGV[2]
local key = NS .. 'req:' .. rid
local job = redis.call('HGET', key, 'job')
if not job then
  if ARGV[6] and ARGV[6] ~= '' then redis.call('DEL', ARGV[6]) end
  return 0
end
if redis.call('ZREM', NS .. 'inflight', rid) == 0 then
  redis.call('LREM', NS .. 'q:' .. job, 1, rid)  -- it was reclaimed and requeued meanwhile
  if redis.call('LLEN', NS .. 'q:' .. job) == 0 then redis.call('ZREM', NS .. 'jobs', job) end
end
redis.call('DEL', key)
redis.call('RPUSH', ARGV[3], ARGV[4])
redis.call('PEXPIRE', ARGV[3], tonumber(ARGV[5]))
return 1
"""

# ARGV: namespace, rid. The front-end withdraws a request whose caller gave up: out of its job's queue unless a
# worker already holds it. Returns 1 withdrawn, 0 gone or being scored.
_CANCEL = """
local rid = ARGV[2]
local key = NS .. 'req:' .. rid
local job = redis.call('HGET', key, 'job')
if not job or redis.call('ZSCORE', NS .. 'inflight', rid) then return 0 end
redis.call('DEL', key)
local q = NS .. 'q:' .. job
redis.call('LREM', q, 1, rid)
if redis.call('LLEN', q) == 0 then redis.call('ZREM', NS .. 'jobs', job) end
redis.call('HINCRBY', NS .. 'stats', 'withdrawn', 1)
return 1
"""

# ARGV: namespace, rid, reason, max_tries, reply_ttl_ms. A worker hands a request back: requeued at the head of
# its job's queue, or failed for good once it has used its attempts. Returns 1 requeued, 2 failed, 0 gone.
_NACK = """
local rid = ARGV[2]
local key = NS .. 'req:' .. rid
local h = redis.call('HMGET', key, 'job', 'reply', 'attempts')
if not h[1] then return 0 end
redis.call('ZREM', NS .. 'inflight', rid)
local attempts = tonumber(h[3])
if attempts >= tonumber(ARGV[4]) then
  give_up(rid, h[2], attempts, ARGV[3], tonumber(ARGV[5]))
  return 2
end
redis.call('HSET', key, 'last_error', ARGV[3])
redis.call('LPUSH', NS .. 'q:' .. h[1], rid)
activate(h[1])
ring()
return 1
"""

# ARGV: namespace, visibility_ms, rid... : pushes the leases of a batch still being computed.
_EXTEND = """
local dl = now_ms() + tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  n = n + redis.call('ZADD', NS .. 'inflight', 'XX', 'CH', dl, ARGV[i])
end
return n
"""

# ARGV: namespace, worker_id, ttl_ms. Heartbeat: records this worker alive, forgets long-dead ones.
_HEARTBEAT = """
local now = now_ms()
redis.call('ZADD', NS .. 'workers', now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', NS .. 'workers', '-inf', now - 10 * tonumber(ARGV[3]))
return now
"""

# ARGV: namespace, ttl_ms. Ids of the workers heard from within the TTL.
_LIVE_WORKERS = """
return redis.call('ZRANGEBYSCORE', NS .. 'workers', now_ms() - tonumber(ARGV[2]), '+inf')
"""

# ARGV: namespace. Queued (unclaimed) requests per job, flat: job, count, job, count, ...
_DEPTHS = """
local out = {}
for _, job in ipairs(redis.call('ZRANGE', NS .. 'jobs', 0, -1)) do
  out[#out + 1] = job
  out[#out + 1] = redis.call('LLEN', NS .. 'q:' .. job)
end
return out
"""

SCRIPTS = {
    name: _LUA_PRELUDE + body
    for name, body in (
        ("enqueue", _ENQUEUE),
        ("claim", _CLAIM),
        ("complete", _COMPLETE),
        ("nack", _NACK),
        ("cancel", _CANCEL),
        ("extend", _EXTEND),
        ("heartbeat", _HEARTBEAT),
        ("live_workers", _LIVE_WORKERS),
        ("depths", _DEPTHS),
    )
}
"""Script name -> full source (prelude + body), registered by both sides of the queue."""
