-- master_cache: apply a diff to the set of KV block cache keys a worker holds.
-- KEYS[1]          master epoch
-- KEYS[2]          the worker's status hash
-- KEYS[3]          its cache block set (signed 64-bit integers as decimal text)
-- ARGV[1]          epoch of the writer's term
-- ARGV[2]          A, the number of keys to add
-- ARGV[3..2+A]     keys to add
-- ARGV[3+A..]      keys to remove
-- Returns {1, SCARD after}, {0, 'gone'} when the worker was removed, or {0, 'stale epoch N, current M'}; on
-- refusal nothing is written.
-- Guarantees: the whole diff lands at once (adds, then removes) or not at all; a removed worker's set is not
-- re-created; any number of keys (commands take at most CHUNK arguments, far below Lua's unpack limit).
-- @include _lib.lua

local ok, current = check_epoch(KEYS[1], ARGV[1])
if not ok then return {0, 'stale epoch ' .. ARGV[1] .. ', current ' .. (current or 'none')} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 'gone'} end

local CHUNK = 1000
local function apply(command, first, last)
  for i = first, last, CHUNK do
    redis.call(command, KEYS[3], unpack(ARGV, i, math.min(i + CHUNK - 1, last)))
  end
end

local last_add = 2 + tonumber(ARGV[2])
apply('SADD', 3, last_add)
apply('SREM', last_add + 1, #ARGV)
return {1, redis.call('SCARD', KEYS[3])}
