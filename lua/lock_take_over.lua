-- lock_take_over: take the master lock from a holder that is gone (its presence connection to Redis closed: the
-- process died), without waiting for the lock's TTL.
-- KEYS[1]          master lock (string "token|epoch|holder", with a TTL)
-- KEYS[2]          master epoch (integer, never reset; see next_epoch)
-- ARGV[1]          the lock's value as the caller read it when it found the holder gone
-- ARGV[2]          the caller's token
-- ARGV[3]          ttl in ms
-- ARGV[4]          the caller's holder description
-- Returns {1, epoch} when the caller holds the lock now, else {0, current epoch, holder}.
-- Guarantees: only the exact term the caller saw gone is replaced (a renewed or new term is left alone), with a new,
-- higher epoch, so the gone holder's writes are refused by fencing even if it was only cut off, not dead.
-- @include _lib.lua

local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  local _, epoch, holder = parse_lock(current)
  return {0, epoch, holder}
end
local epoch = next_epoch(KEYS[2])
redis.call('SET', KEYS[1], ARGV[2] .. '|' .. epoch .. '|' .. ARGV[4], 'PX', ARGV[3])
return {1, tonumber(epoch)}
