-- lookup: which workers hold a prefix of a request's blocks, and how long a prefix each (the inverted index).
-- KEYS             the block keys ("flexlb:{svc}:blk:<hash>") of one chunk of the request, in prompt order
-- ARGV             workers that held every block of the previous chunks (none for the first chunk)
-- Returns {{workers holding every block of this chunk}, {worker, blocks held in this chunk, ...}} for the others.
-- Guarantees: a strict prefix match per worker: a worker's first missing block ends its match; the walk stops at
-- the first block no remaining worker holds, so the work grows with the matched prefix, not with the fleet.
local alive = {}
if #ARGV == 0 then
  alive = redis.call('SMEMBERS', KEYS[1])
else
  for i = 1, #ARGV do alive[i] = ARGV[i] end
end
local first = #ARGV == 0 and 2 or 1
local dropped = {}
if #alive == 0 then return {{}, dropped} end
for i = first, #KEYS do
  local held = redis.call('SMISMEMBER', KEYS[i], unpack(alive))
  local still = {}
  for j = 1, #alive do
    if held[j] == 1 then
      still[#still + 1] = alive[j]
    else
      dropped[#dropped + 1] = alive[j]
      dropped[#dropped + 1] = i - 1
    end
  end
  alive = still
  if #alive == 0 then break end
end
return {alive, dropped}
