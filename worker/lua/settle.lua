-- The job's settlement, in one round trip: every part runs, in order.
-- KEYS, ARGV: the parts' (see parts.lua). Reply: the replies of the parts, in order.
local replies = {}
llmq.each_part(KEYS, ARGV, function(name, keys, args)
  replies[#replies + 1] = llmq[name](keys, args)
end)
return replies
