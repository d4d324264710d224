-- Fleet-wide latency samples, scored by Redis server time.

-- latency_record: add one sample per metric and trim each window.
-- KEYS: one sorted set per metric. ARGV: window (s), most samples kept, a member suffix
--       unique to this job, then per metric its value in ms ('' when unknown).
-- Reply: {1}.
llmq.latency_record = function(KEYS, ARGV)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local window, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
  for i, key in ipairs(KEYS) do
    local value = ARGV[i + 3]
    if value ~= '' then
      -- Members must be unique or equal latencies would overwrite each other.
      redis.call('ZADD', key, now, value .. ':' .. ARGV[3] .. ':' .. i)
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
      redis.call('ZREMRANGEBYRANK', key, 0, -keep - 1)
    end
  end
  return {1}
end
