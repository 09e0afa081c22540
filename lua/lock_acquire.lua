-- lock_acquire: become master when the lock is free; a holder calling again renews (a retry after a lost reply).
-- KEYS[1]          master lock (string "token|epoch|holder", with a TTL)
-- KEYS[2]          master epoch (integer, never reset; see next_epoch)
-- ARGV[1]          token (random, one per term of one process)
-- ARGV[2]          ttl in ms
-- ARGV[3]          holder description ("host:port pid")
-- Returns {1, epoch} when this token holds the lock now, else {0, current epoch, holder}.
-- Guarantees: each new holder's epoch is max(server time in ms, previous epoch + 1): strictly growing, and never an
-- epoch used before even after Redis lost its data, unless the server clock went back by more than the time between
-- the two elections; the lock always has a TTL, set (never added) to ttl.
-- @include _lib.lua

local current = redis.call('GET', KEYS[1])
if not current then
  local epoch = next_epoch(KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch .. '|' .. ARGV[3], 'PX', ARGV[2])
  return {1, tonumber(epoch)}
end
local token, epoch, holder = parse_lock(current)
if token == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, epoch}
end
return {0, epoch, holder}
