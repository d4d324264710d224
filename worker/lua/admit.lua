-- The job's admission, in one round trip: reuse, circuit, budget, rate limits.
-- KEYS and ARGV: the parts' own, one after the other; ARGV[1] is a JSON list of
-- [function, number of keys, number of args] per part, in order.
-- Each part runs in turn and the first that refuses ends the admission: what it held is
-- given back (a budget reservation, a half-open probe), except leases, which the caller
-- keeps or releases. Reply: the replies of the parts that ran, in order.
local layout = cjson.decode(ARGV[1])
local k, a = 0, 1
local replies, undo = {}, {}
for _, part in ipairs(layout) do
  local name, nkeys, nargs = part[1], part[2], part[3]
  local keys, args = {}, {}
  for i = 1, nkeys do keys[i] = KEYS[k + i] end
  for i = 1, nargs do args[i] = ARGV[a + i] end
  k, a = k + nkeys, a + nargs
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
    return replies
  end
end
return replies
