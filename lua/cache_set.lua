-- cache_set: replace the set of block cache keys a worker holds (operators and tests; the master applies diffs).
-- KEYS[1]          the worker's status hash
-- KEYS[2]          the worker's cache block set
-- KEYS[3], KEYS[4] the change stream and its entry counter
-- ARGV[1]          worker id
-- ARGV[2]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- ARGV[3..]        the keys it holds now
-- Returns the number of keys it holds after.
-- Guarantees: the worker's set and, for a prefill-type worker, the inverted index change together; a 'k' entry
-- tells the routers' block mirrors to read the worker's sets again.
-- @include _lib.lua

unindex_blocks(KEYS[2], ARGV[2], ARGV[1])
local indexed = INDEXED_ROLES[redis.call('HGET', KEYS[1], 'role') or '']
for i = 3, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  if indexed then redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[1]) end
end
stream_add(KEYS[3], KEYS[4], 'k', {'w', ARGV[1], 'op', 'l'})
return redis.call('SCARD', KEYS[2])
