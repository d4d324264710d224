-- The job's settlement, in one round trip: every part runs, in order.
-- KEYS and ARGV: the parts' own, one after the other; ARGV[1] is a JSON list of
-- [function, number of keys, number of args] per part.
-- Reply: the replies of the parts, in order.
local layout = cjson.decode(ARGV[1])
local k, a = 0, 1
local replies = {}
for _, part in ipairs(layout) do
  local name, nkeys, nargs = part[1], part[2], part[3]
  local keys, args = {}, {}
  for i = 1, nkeys do keys[i] = KEYS[k + i] end
  for i = 1, nargs do args[i] = ARGV[a + i] end
  k, a = k + nkeys, a + nargs
  replies[#replies + 1] = llmq[name](keys, args)
end
return replies
