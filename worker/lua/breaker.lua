-- The circuit breaker of one provider endpoint, shared by every worker.

-- breaker_admit: may the provider be called now?
-- KEYS: circuit hash, probe lock. ARGV: now (s), probe ttl (ms), probe token.
-- Reply: 'closed', 'probe' (the one half-open call: ours) or 'open'.
llmq.breaker_admit = function(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 'closed' end
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if tonumber(ARGV[1]) < open_until then return 'open' end
  if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return 'probe' end
  return 'open'
end

-- breaker_record: count one call's result; may open or close the circuit.
-- KEYS: circuit hash, probe lock, window counters, index of circuits.
-- ARGV: now, result (success|failure|neutral), probe (1|0), failures in a row,
--       failure rate, min calls, window seconds, cooldown, last error, circuit, key ttl.
-- Reply: the state after it ('closed' or 'open'), 'opened' when this call opened it.
llmq.breaker_record = function(KEYS, ARGV)
  local now = tonumber(ARGV[1])
  local result, probe = ARGV[2], ARGV[3] == '1'
  local cooldown = tonumber(ARGV[8])
  redis.call('SADD', KEYS[4], ARGV[10])
  local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
  if result == 'neutral' then
    if probe then redis.call('DEL', KEYS[2]) end
    return state
  end
  redis.call('HINCRBY', KEYS[3], 'calls', 1)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]) * 2)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[11]))
  if result == 'success' then
    redis.call('HSET', KEYS[1], 'consecutive', 0)
    if probe and state == 'open' then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at', now)
      redis.call('HDEL', KEYS[1], 'since', 'open_until', 'opens')
      redis.call('DEL', KEYS[2], KEYS[3])
      return 'closed'
    end
    return state
  end
  redis.call('HINCRBY', KEYS[3], 'failures', 1)
  local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
  redis.call('HSET', KEYS[1], 'last_error', ARGV[9], 'last_failure_at', now)
  if state == 'open' then
    if probe then
      redis.call('HSET', KEYS[1], 'open_until', now + cooldown)
      redis.call('HINCRBY', KEYS[1], 'opens', 1)
      redis.call('DEL', KEYS[2])
    end
    return 'open'
  end
  local calls = tonumber(redis.call('HGET', KEYS[3], 'calls'))
  local failures = tonumber(redis.call('HGET', KEYS[3], 'failures') or '0')
  local by_run = consecutive >= tonumber(ARGV[4])
  local by_rate = calls >= tonumber(ARGV[6]) and failures / calls >= tonumber(ARGV[5])
  if by_run or by_rate then
    local reason = by_run and (consecutive .. ' failures in a row')
      or (failures .. ' of ' .. calls .. ' calls failed')
    redis.call('HSET', KEYS[1], 'state', 'open', 'since', now, 'open_until', now + cooldown,
      'opens', 1, 'reason', reason)
    return 'opened'
  end
  return 'closed'
end
