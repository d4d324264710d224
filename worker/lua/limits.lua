-- Rate limits: sliding-window logs on Redis server time, checked and reserved together.

-- limits_reserve: reserve in every limit, or in none.
-- KEYS: per limit, its log (zset: reservation id -> Redis time in microseconds) and its
--       amounts (hash: reservation id -> amount, '~total' of those, '~seq' decisions).
-- ARGV: the reservation id, then per limit: limit, window (microseconds), amount.
-- Reply: {admitted 1|0, now_us, binding limit index or 0, wait_us or -1 for never,
--         usage before the decision per limit..., decision sequence number per limit...}.
llmq.limits_reserve = function(KEYS, ARGV)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local id = ARGV[1]
  local n = #KEYS / 2
  local used, seqs = {}, {}
  local binding, binding_wait = 0, -2
  for i = 1, n do
    local log, amounts = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 1])
    local window = tonumber(ARGV[3 * i])
    local amount = tonumber(ARGV[3 * i + 1])
    while true do
      local expired = redis.call('ZRANGEBYSCORE', log, '-inf', now - window, 'LIMIT', 0, 500)
      if #expired == 0 then break end
      local freed = 0
      for _, v in ipairs(redis.call('HMGET', amounts, unpack(expired))) do
        freed = freed + (tonumber(v) or 0)
      end
      redis.call('ZREM', log, unpack(expired))
      redis.call('HDEL', amounts, unpack(expired))
      redis.call('HINCRBY', amounts, '~total', -freed)
    end
    used[i] = tonumber(redis.call('HGET', amounts, '~total') or '0')
    seqs[i] = redis.call('HINCRBY', amounts, '~seq', 1)
    local ttl = math.ceil(window / 1000) + 1000
    redis.call('PEXPIRE', log, ttl)
    redis.call('PEXPIRE', amounts, ttl)
    if used[i] + amount > limit then
      local wait = -1
      if amount <= limit then
        -- The oldest reservations leave the window first: wait until enough have left.
        local need, freed, offset = used[i] + amount - limit, 0, 0
        wait = window
        while true do
          local page = redis.call('ZRANGE', log, offset, offset + 499, 'WITHSCORES')
          if #page == 0 then break end
          local done = false
          for j = 1, #page, 2 do
            freed = freed + (tonumber(redis.call('HGET', amounts, page[j])) or 0)
            if freed >= need then
              wait = tonumber(page[j + 1]) + window - now
              done = true
              break
            end
          end
          if done then break end
          offset = offset + 500
        end
      end
      -- Report the limit that frees up last; -1 (never) is the latest of all.
      if binding == 0 or (binding_wait ~= -1 and (wait == -1 or wait > binding_wait)) then
        binding, binding_wait = i, wait
      end
    end
  end
  local reply = {binding == 0 and 1 or 0, now, binding, binding_wait}
  if binding == 0 then
    for i = 1, n do
      local log, amounts = KEYS[2 * i - 1], KEYS[2 * i]
      local amount = tonumber(ARGV[3 * i + 1])
      redis.call('ZADD', log, now, id)
      redis.call('HSET', amounts, id, amount)
      redis.call('HINCRBY', amounts, '~total', amount)
    end
  end
  for i = 1, n do reply[#reply + 1] = used[i] end
  for i = 1, n do reply[#reply + 1] = seqs[i] end
  return reply
end

-- limits_adjust: settle or release a reservation in each limit.
-- KEYS: per limit, log and amounts. ARGV: the reservation id, then per limit the new
-- amount: an integer, '' to keep it, or 'x' to remove the reservation. A reservation
-- that already left its window (or whose keys expired) is not touched.
-- Reply: 1.
llmq.limits_adjust = function(KEYS, ARGV)
  local id = ARGV[1]
  for i = 1, #KEYS / 2 do
    local log, amounts = KEYS[2 * i - 1], KEYS[2 * i]
    local new = ARGV[i + 1]
    if new ~= '' and redis.call('ZSCORE', log, id) then
      local old = tonumber(redis.call('HGET', amounts, id) or '0')
      if new == 'x' then
        redis.call('ZREM', log, id)
        redis.call('HDEL', amounts, id)
        redis.call('HINCRBY', amounts, '~total', -old)
      else
        redis.call('HSET', amounts, id, tonumber(new))
        redis.call('HINCRBY', amounts, '~total', tonumber(new) - old)
      end
    end
  end
  return 1
end

-- limits_usage: each limit's usage now. Read-only.
-- KEYS: per limit, log and amounts. ARGV: per limit its window (microseconds).
-- Reply: {now_us, then per limit: usage in the window, microseconds until the oldest
--         entry leaves it (0 when empty)}.
llmq.limits_usage = function(KEYS, ARGV)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local reply = {now}
  for i = 1, #KEYS / 2 do
    local log, amounts = KEYS[2 * i - 1], KEYS[2 * i]
    local window = tonumber(ARGV[i])
    local used, offset, oldest = 0, 0, 0
    while true do
      local page = redis.call('ZRANGEBYSCORE', log, '(' .. (now - window), '+inf',
                              'WITHSCORES', 'LIMIT', offset, 500)
      if #page == 0 then break end
      if offset == 0 then oldest = tonumber(page[2]) + window - now end
      for j = 1, #page, 2 do
        used = used + (tonumber(redis.call('HGET', amounts, page[j])) or 0)
      end
      offset = offset + 500
    end
    reply[#reply + 1] = used
    reply[#reply + 1] = oldest
  end
  return reply
end
