-- lock_release: give the master lock up (graceful handover), so another process need not wait for the TTL.
-- KEYS[1]          master lock (string "token|epoch|holder", with a TTL)
-- ARGV[1]          token
-- Returns 1 if deleted, 0 if the lock was not held by this token.
-- Guarantees: never deletes another holder's lock; the epoch stays, so the next holder gets a higher one.
-- @include _lib.lua

local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local token = parse_lock(current)
if token ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
