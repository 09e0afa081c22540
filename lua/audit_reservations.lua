-- audit_reservations: one worker's pending load beside the reservations that should add up to it, read in one
-- atomic step (flexlb bench chaos, tests); writes nothing.
-- KEYS[1]          the worker's status hash
-- KEYS[2]          its reservations zset
-- ARGV[1]          worker id
-- Returns {pending_count, pending_tokens, {request id, tokens, ...}} with each reservation's tokens as its
-- request's index holds them ('' when the index lost them).
-- @include _lib.lua

local pending = redis.call('HMGET', KEYS[1], 'pending_count', 'pending_tokens')
local prefix = request_prefix(KEYS[1], ARGV[1])
local held = {}
for _, rid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  held[#held + 1] = rid
  held[#held + 1] = redis.call('HGET', prefix .. rid, ARGV[1]) or ''
end
return {pending[1] or '0', pending[2] or '0', held}
