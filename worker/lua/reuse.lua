-- Reuse: idempotency bindings, stored results, the job lease, the response cache.

-- reuse_admit: may this delivery run the job, or is its answer known already?
-- KEYS: binding, result, lease, task owner ('' when the task id is unknown),
--       cache entry, cache lease, cache stats ('' x3 when the job is not cacheable).
-- ARGV: fingerprint, owner hash, ttl (s), lease token, lease ttl (ms),
--       take the cache lease (1|0), request id.
-- Reply: {1, 'lead'} (leases held: call the provider), or {0, kind, ...}:
--   'conflict' (the id is bound to another request), 'task_conflict' (another user's
--   task id), 'replay', result json | 'cached', served json, the entry's cost (string) |
--   'follow_job' (another delivery runs it) | 'follow_cache' (an identical job calls).
llmq.reuse_admit = function(KEYS, ARGV)
  local ttl = tonumber(ARGV[3])
  local bound = redis.call('GET', KEYS[1])
  if not bound then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
  elseif bound ~= ARGV[1] then
    return {0, 'conflict'}
  end
  if KEYS[4] ~= '' then
    local owner = redis.call('GET', KEYS[4])
    if not owner then
      redis.call('SET', KEYS[4], ARGV[2], 'EX', ttl)
    elseif owner ~= ARGV[2] then
      return {0, 'task_conflict'}
    end
  end
  local stored = redis.call('GET', KEYS[2])
  if stored then return {0, 'replay', stored} end
  local lease = redis.call('GET', KEYS[3])
  if lease and lease ~= ARGV[4] then return {0, 'follow_job'} end
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
  if KEYS[5] == '' then return {1, 'lead'} end
  local entry = redis.call('GET', KEYS[5])
  if entry then
    local served = cjson.decode(entry)
    local cost = served['cost_usd'] or 0
    served['cached'] = true
    served['cost_usd'] = 0
    served['attempts'] = 0
    served['request_id'] = ARGV[7]
    local json = cjson.encode(served)
    redis.call('HINCRBY', KEYS[7], 'hits', 1)
    redis.call('HINCRBYFLOAT', KEYS[7], 'saved_usd', cost)
    -- Kept under the request_id like any answer: a retry of this job replays it.
    redis.call('SET', KEYS[2], json, 'EX', ttl)
    redis.call('DEL', KEYS[3])
    return {0, 'cached', json, tostring(cost)}
  end
  if ARGV[6] == '1' then
    local holder = redis.call('GET', KEYS[6])
    if holder and holder ~= ARGV[4] then return {0, 'follow_cache'} end
    redis.call('SET', KEYS[6], ARGV[4], 'PX', ARGV[5])
  end
  redis.call('HINCRBY', KEYS[7], 'misses', 1)
  return {1, 'lead'}
end

-- reuse_store: keep a paid-for answer and let identical jobs go.
-- KEYS: result, job lease, cache entry ('' when not stored), cache lease ('' when none).
-- ARGV: result json, ttl (s), lease token, cache entry json ('' none), cache ttl (s).
-- Reply: {1}.
llmq.reuse_store = function(KEYS, ARGV)
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  if KEYS[3] ~= '' and ARGV[4] ~= '' then
    redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
  end
  llmq.reuse_release({KEYS[2], KEYS[4]}, {ARGV[3]})
  return {1}
end

-- reuse_release: give up leases we hold (another holder's are left alone).
-- KEYS: leases ('' entries skipped). ARGV: lease token. Reply: {1}.
llmq.reuse_release = function(KEYS, ARGV)
  for _, key in ipairs(KEYS) do
    if key ~= '' and redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
  end
  return {1}
end

-- cache_lookup: a producer-side hit, counted, or nothing (the worker counts misses).
-- KEYS: cache entry, cache stats. ARGV: none. Reply: {entry json} or {}.
llmq.cache_lookup = function(KEYS, ARGV)
  local entry = redis.call('GET', KEYS[1])
  if not entry then return {} end
  redis.call('HINCRBY', KEYS[2], 'hits', 1)
  redis.call('HINCRBYFLOAT', KEYS[2], 'saved_usd', cjson.decode(entry)['cost_usd'] or 0)
  return {entry}
end
