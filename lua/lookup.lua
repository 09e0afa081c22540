-- lookup: which workers hold a prefix of a request's blocks, and how long a prefix each.
-- KEYS             the block keys ("flexlb:{svc}:blk:<hash>", the inverted index) of one chunk of the request, in
--                  prompt order
-- ARGV[1]          the prefix of the workers' own block sets ("flexlb:{svc}:cache:"; the same hash slot as KEYS)
-- ARGV[2]          the prefix of the workers' in-flight block zsets ("flexlb:{svc}:inflight:"; the same slot)
-- ARGV[3]          FOLLOW: at most this many workers are followed from the first block
-- ARGV[4]          N, the number of blocks in the chunk
-- ARGV[5..4+N]     the chunk's block hashes, in KEYS order
-- ARGV[5+N..]      workers that held every block of the previous chunks (none for the first chunk)
-- Returns {{workers holding every block of this chunk}, {worker, blocks held in this chunk, ...} for the others,
-- deepest}: deepest is, when the holders were sampled, how many leading blocks of the chunk some worker holds (the
-- bisection's answer), else 0 (every holder was followed: the matches say it).
-- Guarantees: a strict prefix match per worker: its first missing block ends its match. A block is held when the
-- worker's own set has it or it is in flight there (reserved for a request, lua/reserve.lua) and not expired. The inverted index names
-- the candidates (holders of the first block), each candidate's own set is asked once for the whole chunk, so the
-- work is bounded by FOLLOW calls whatever the fleet: when more than FOLLOW workers hold the first block (a popular
-- system prompt), a random FOLLOW of them are followed plus up to FOLLOW holders of the deepest block held at all
-- (found by bisection), so the workers with the longest match are not lost in the sample.
local cache_prefix, inflight_prefix, follow, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local first, last = 5, 4 + n
local alive = {}
local deepest = 0
local first_chunk = #ARGV == last
if first_chunk then
  local holders = redis.call('SCARD', KEYS[1])
  if holders <= follow then
    alive = redis.call('SMEMBERS', KEYS[1])
  else
    alive = redis.call('SRANDMEMBER', KEYS[1], follow)
    local lo, hi = 1, #KEYS
    while lo < hi do
      local mid = math.ceil((lo + hi) / 2)
      if redis.call('EXISTS', KEYS[mid]) == 1 then lo = mid else hi = mid - 1 end
    end
    deepest = lo
    if lo > 1 then
      local chosen = {}
      for _, w in ipairs(alive) do chosen[w] = true end
      for _, w in ipairs(redis.call('SRANDMEMBER', KEYS[lo], follow)) do
        if not chosen[w] then alive[#alive + 1] = w end
      end
    end
  end
else
  for i = last + 1, #ARGV do alive[#alive + 1] = ARGV[i] end
end
local now
local whole, dropped = {}, {}
for _, w in ipairs(alive) do
  local held = redis.call('SMISMEMBER', cache_prefix .. w, unpack(ARGV, first, last))
  local m = 0
  while m < n and held[m + 1] == 1 do m = m + 1 end
  -- the rest may be in flight there: one ZSCORE of the first block it lacks tells (a prompt's own new tail, the
  -- common case, is in flight nowhere), and only then are the others read
  local next_expiry = m < n and redis.call('ZSCORE', inflight_prefix .. w, ARGV[first + m])
  if next_expiry then
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    if tonumber(next_expiry) > now then
      local from = m
      local expiry = redis.call('ZMSCORE', inflight_prefix .. w, unpack(ARGV, first + from, last))
      while m < n and (held[m + 1] == 1 or (expiry[m + 1 - from] and tonumber(expiry[m + 1 - from]) > now)) do
        m = m + 1
      end
    end
  end
  if m == n then
    whole[#whole + 1] = w
  elseif m > 0 or not first_chunk then  -- a worker from the earlier chunks matched those whole
    dropped[#dropped + 1] = w
    dropped[#dropped + 1] = m
  end
end
return {whole, dropped, deepest}
