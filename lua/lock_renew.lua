-- lock_renew: keep the master lock for another ttl.
-- KEYS[1]          master lock (string "token|epoch|holder", with a TTL)
-- ARGV[1]          token
-- ARGV[2]          epoch of the caller's term
-- ARGV[3]          ttl in ms
-- Returns 1 if renewed, 0 if the lock expired or belongs to another token or epoch.
-- Guarantees: the TTL is reset to ttl, never added to (a heartbeat cannot push the expiry out without bound).
-- @include _lib.lua

local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local token, epoch = parse_lock(current)
if token ~= ARGV[1] or epoch ~= tonumber(ARGV[2]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
