-- master_cache: apply a diff to the set of KV block cache keys a worker holds, and to the inverted index.
-- KEYS[1]          master epoch
-- KEYS[2]          the worker's status hash
-- KEYS[3]          its cache block set (signed 64-bit integers as decimal text)
-- KEYS[4], KEYS[5] the change stream and its entry counter
-- ARGV[1]          epoch of the writer's term
-- ARGV[2]          worker id
-- ARGV[3]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- ARGV[4]          A, the number of keys to add
-- ARGV[5..4+A]     keys to add
-- ARGV[5+A..]      keys to remove
-- Returns {1, SCARD after}, {0, 'gone'} when the worker was removed, or {0, 'stale epoch N, current M'}; on
-- refusal nothing is written.
-- Guarantees: the whole diff lands at once (adds, then removes) or not at all, in the worker's set and, for a
-- prefill-type worker, in the inverted index (block -> workers holding it); a removed worker's set is not
-- re-created. An added block that was in flight there is confirmed (no longer in flight); a removed one that is
-- still in flight stays in the index until it expires; expired in-flight blocks are cleared (a bounded number per
-- call: the worker's cache reports come often). For a prefill-type worker, what changed goes on the stream as a 'k'
-- entry (the routers' block mirrors, flexlb/state/block_mirror.py).
-- @include _lib.lua

local ok, current = check_epoch(KEYS[1], ARGV[1])
if not ok then return {0, 'stale epoch ' .. ARGV[1] .. ', current ' .. (current or 'none')} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 'gone'} end

local wid, block_prefix = ARGV[2], ARGV[3]
local indexed = INDEXED_ROLES[redis.call('HGET', KEYS[2], 'role') or ''] or false
local last_add = 4 + tonumber(ARGV[4])
local ik, hk = inflight_key(block_prefix, wid), inflight_heads_key(block_prefix, wid)
local inflight = redis.call('EXISTS', ik, hk) > 0
local added, removed = {}, {}
for i = 5, last_add do
  if redis.call('SADD', KEYS[3], ARGV[i]) == 1 and indexed then
    redis.call('SADD', block_prefix .. ARGV[i], wid)
    added[#added + 1] = ARGV[i]
  elseif inflight and indexed then  -- cached already, perhaps also in flight: confirmed in the mirrors too
    added[#added + 1] = ARGV[i]
  end
end
if inflight then  -- confirmed: in chunks, as unpack is bounded by Lua's stack
  for i = 5, last_add, 1000 do
    redis.call('ZREM', ik, unpack(ARGV, i, math.min(i + 999, last_add)))
    redis.call('ZREM', hk, unpack(ARGV, i, math.min(i + 999, last_add)))
  end
end
local now = now_ms()
for i = last_add + 1, #ARGV do
  if redis.call('SREM', KEYS[3], ARGV[i]) == 1 and indexed then
    removed[#removed + 1] = ARGV[i]
    -- only an in-flight head is in the index for being in flight: it stays there until it expires
    local until_ms = inflight and tonumber(redis.call('ZSCORE', hk, ARGV[i]) or 0) or 0
    if until_ms <= now then redis.call('SREM', block_prefix .. ARGV[i], wid) end
  end
end
if inflight then expire_inflight(block_prefix, KEYS[3], wid, now, 256) end
if indexed then blocks_changed(KEYS[4], KEYS[5], wid, added, removed) end
return {1, redis.call('SCARD', KEYS[3])}
