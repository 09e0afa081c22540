-- cache_set: replace the set of block cache keys a worker holds (operators and tests; the master applies diffs).
-- KEYS[1]          the worker's cache block set
-- ARGV[1]          worker id
-- ARGV[2]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- ARGV[3..]        the keys it holds now
-- Returns the number of keys it holds after.
-- Guarantees: the worker's set and the inverted index change together.
-- @include _lib.lua

unindex_blocks(KEYS[1], ARGV[2], ARGV[1])
for i = 3, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[1])
end
return redis.call('SCARD', KEYS[1])
