-- The job's admission, in one round trip: reuse, circuit, budget, rate limits.
-- KEYS, ARGV: the parts' (see parts.lua). Each part runs in turn and the first that
-- refuses ends the admission: what the earlier ones reserved is given back (a budget
-- reservation, a half-open probe), except leases, which the caller keeps or releases.
-- Reply: the replies of the parts that ran, in order.
local replies, undo = {}, {}
llmq.each_part(KEYS, ARGV, function(name, keys, args)
  local reply = llmq[name](keys, args)
  replies[#replies + 1] = reply
  local go_on
  if name == 'breaker_admit' then
    go_on = reply ~= 'open'
    if reply == 'probe' then undo[#undo + 1] = {'DEL', keys[2]} end
  else
    go_on = reply[1] == 1
    if go_on and name == 'budget_reserve' then undo[#undo + 1] = {'HDEL', keys[1], args[1]} end
  end
  if not go_on then
    for _, command in ipairs(undo) do redis.call(unpack(command)) end
  end
  return go_on
end)
return replies
