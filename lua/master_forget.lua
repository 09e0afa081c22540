-- master_forget: a worker silent past the worker timeout: mark it not alive and forget what it held.
-- KEYS[1]          master epoch
-- KEYS[2]          the worker's status hash
-- KEYS[3]          its reservations zset
-- KEYS[4]          its cache block set
-- KEYS[5], KEYS[6] the change stream and its entry counter
-- ARGV[1]          epoch of the writer's term
-- ARGV[2]          worker id
-- ARGV[3]          pub/sub channel of fleet events
-- ARGV[4]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- Returns {1, reservations released}, {0, 'gone'} when the worker was removed, or {0, 'stale epoch N, current M'};
-- on refusal nothing is written.
-- Guarantees: the worker stays registered but is not alive, with no load, no reservations and no cached blocks
-- (it is gone from every block of the inverted index too, and a 'k' entry says so); status_version grows by one, an 's' stream entry
-- carries the new fields and "status <worker id> <status_version>" is published; the req:<rid> indexes still
-- naming it release as no-ops; a removed worker is not re-created.
-- @include _lib.lua

local ok, current = check_epoch(KEYS[1], ARGV[1])
if not ok then return {0, 'stale epoch ' .. ARGV[1] .. ', current ' .. (current or 'none')} end
local wk, rk, ck = KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', wk) == 0 then return {0, 'gone'} end

local released = redis.call('ZCARD', rk)
redis.call('DEL', rk)
unindex_blocks(ck, ARGV[4], ARGV[2])
local fields = {'alive', 0, 'running', 0, 'waiting', 0, 'queued_tokens', 0, 'kv_used', 0,
                'pending_count', 0, 'pending_tokens', 0, 'updated_ms', now_ms()}
redis.call('HSET', wk, unpack(fields))
local version = redis.call('HINCRBY', wk, 'status_version', 1)
fields[#fields + 1] = 'status_version'
fields[#fields + 1] = version
fields[#fields + 1] = 'w'
fields[#fields + 1] = ARGV[2]
stream_add(KEYS[5], KEYS[6], 's', fields)
stream_add(KEYS[5], KEYS[6], 'k', {'w', ARGV[2], 'op', 'l'})  -- the block mirrors: it holds nothing now
redis.call('PUBLISH', ARGV[3], 'status ' .. ARGV[2] .. ' ' .. version)
return {1, released}
