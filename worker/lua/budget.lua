-- Daily budgets: money in integer units of 1e-10 USD, per user and UTC day.

-- budget_reserve: hold a worst case if spent + reserved + it fits the budget.
-- KEYS: the user's held reservations, the user's counters, the day's holders.
-- ARGV: reservation id, units, budget units (-1: none), ttl (s), retention (s), user id.
-- Reply: {1|0 reserved, spent units, units reserved by other jobs} (numbers as strings).
llmq.budget_reserve = function(KEYS, ARGV)
  local now = tonumber(redis.call('TIME')[1])
  local held = redis.call('HGETALL', KEYS[1])
  local reserved = 0
  for i = 1, #held, 2 do
    local units, expires = string.match(held[i + 1], '^(%d+):(%d+)$')
    if units == nil or tonumber(expires) <= now then
      redis.call('HDEL', KEYS[1], held[i])
    else
      reserved = reserved + tonumber(units)
    end
  end
  local spent = tonumber(redis.call('HGET', KEYS[2], 'cost_units') or '0')
  local units = tonumber(ARGV[2])
  local budget = tonumber(ARGV[3])
  if budget >= 0 and spent + reserved + units > budget then
    return {0, tostring(spent), tostring(reserved)}
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. tostring(now + tonumber(ARGV[4])))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  -- Found by totals() before the user's first settle: in-flight money is shown too.
  redis.call('SADD', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  return {1, tostring(spent), tostring(reserved)}
end

-- budget_settle: replace a reservation by what the answer cost.
-- KEYS: held, user, model, provider, total counters, index of names, alert flag.
-- ARGV: reservation id, input, output, cached input tokens, cost units, saved units,
--       alert threshold units (-1: none), retention (s), user/model/provider index entries.
-- Reply: {alert now? 1|0, total cost units today (string), reservation still held? 1|0}.
llmq.budget_settle = function(KEYS, ARGV)
  local held = redis.call('HDEL', KEYS[1], ARGV[1])
  local fields = {'input_tokens', 'output_tokens', 'cached_input_tokens', 'cost_units',
                  'saved_units'}
  for k = 2, 5 do
    redis.call('HINCRBY', KEYS[k], 'requests', 1)
    for f = 1, 5 do
      redis.call('HINCRBY', KEYS[k], fields[f], ARGV[f + 1])
    end
    redis.call('EXPIRE', KEYS[k], ARGV[8])
  end
  redis.call('SADD', KEYS[6], ARGV[9], ARGV[10], ARGV[11])
  redis.call('EXPIRE', KEYS[6], ARGV[8])
  local total = redis.call('HGET', KEYS[5], 'cost_units')
  local threshold = tonumber(ARGV[7])
  if threshold >= 0 and tonumber(total) >= threshold
      and redis.call('SET', KEYS[7], total, 'NX', 'EX', ARGV[8]) then
    return {1, total, held}
  end
  return {0, total, held}
end

-- budget_release: drop a reservation (nothing was billed).
-- KEYS: the user's held reservations. ARGV: reservation id. Reply: {1}.
llmq.budget_release = function(KEYS, ARGV)
  redis.call('HDEL', KEYS[1], ARGV[1])
  return {1}
end
