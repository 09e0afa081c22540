-- shard_pollers: a process that shares the polling shards says it is alive, and learns how many are.
-- KEYS[1]          the pollers zset (poller id -> expiry, Redis server ms)
-- ARGV[1]          this process's poller id
-- ARGV[2]          TTL ms: it counts as alive this long after this call; 0: it leaves now
-- Returns the number of live pollers, this one included unless it left.
-- Guarantees: entries past their expiry are dropped first (a SIGKILLed process stops counting after its TTL); the
-- zset itself expires when no poller renews it.
-- @include _lib.lua

local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
