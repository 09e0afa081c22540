-- fenced_set: a master's HSET, done only while its epoch is still the current one (the pattern of master writes).
-- KEYS[1]          master epoch
-- KEYS[2]          the hash to write
-- ARGV[1]          epoch of the writer's term
-- ARGV[2..]        field, value pairs
-- Returns 1 when written, else {0, 'stale epoch N, current M'}.
-- Guarantees: once a new master was elected, no write of an older master lands, however long it was paused.
-- @include _lib.lua

local ok, current = check_epoch(KEYS[1], ARGV[1])
if not ok then return {0, 'stale epoch ' .. ARGV[1] .. ', current ' .. (current or 'none')} end
if #ARGV > 1 then redis.call('HSET', KEYS[2], unpack(ARGV, 2)) end
return 1
