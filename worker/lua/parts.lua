-- Running several parts in one script: each part is a library function with its own
-- KEYS and ARGV, laid out one after the other.

-- each_part: call visit(name, keys, args) per part until it returns false.
-- KEYS: the parts' keys in order. ARGV[1]: JSON list of [function, number of keys, number
-- of args] per part; ARGV[2]: JSON list of all the parts' args, as strings (one argument
-- to pack instead of dozens, on the client's side). Returns nothing.
llmq.each_part = function(KEYS, ARGV, visit)
  local layout = cjson.decode(ARGV[1])
  local all_args = cjson.decode(ARGV[2])
  local k, a = 0, 0
  for _, part in ipairs(layout) do
    local nkeys, nargs = part[2], part[3]
    local keys, args = {}, {}
    for i = 1, nkeys do keys[i] = KEYS[k + i] end
    for i = 1, nargs do args[i] = all_args[a + i] end
    k, a = k + nkeys, a + nargs
    if visit(part[1], keys, args) == false then return end
  end
end
