-- master_status: write one worker's polled status and drop the reservations the worker now accounts for itself.
-- KEYS[1]          master epoch
-- KEYS[2]          the worker's status hash
-- KEYS[3]          its reservations zset (request id -> expiry ms)
-- KEYS[4], KEYS[5] the change stream and its entry counter
-- KEYS[6..]        the index hash req:<rid> of each request id in ARGV, in the same order (it holds their tokens)
-- ARGV[1]          epoch of the writer's term
-- ARGV[2]          worker id
-- ARGV[3]          pub/sub channel of fleet events
-- ARGV[4]          N, the number of field, value pairs
-- ARGV[5..4+2N]    field, value pairs to set
-- ARGV[5+2N..]     request ids the worker reported running, waiting or finished (new ones only)
-- Returns {1, reservations dropped, status_version}, {0, 'gone'} when the worker was removed, or
-- {0, 'stale epoch N, current M'}; on refusal nothing is written.
-- Guarantees: a reservation is dropped exactly once, when the worker reports its request: from then the worker's
-- own running/waiting counts carry it; unknown ids change nothing; status_version grows by one per write; an 's'
-- stream entry carries the fields written (with status_version, updated_ms and the pending load) and
-- "status <worker id> <status_version>" is published; a removed worker is not re-created.
-- @include _lib.lua

local ok, current = check_epoch(KEYS[1], ARGV[1])
if not ok then return {0, 'stale epoch ' .. ARGV[1] .. ', current ' .. (current or 'none')} end
local wk, rk = KEYS[2], KEYS[3]
local wid, n = ARGV[2], tonumber(ARGV[4])
if redis.call('EXISTS', wk) == 0 then return {0, 'gone'} end

local now = now_ms()
expire_reservations(wk, rk, wid, now)
local first_rid = 5 + 2 * n
local fields = {'updated_ms', now}
for i = 5, first_rid - 1 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', wk, unpack(fields))
local version = redis.call('HINCRBY', wk, 'status_version', 1)

local dropped, freed, lost = 0, 0, false
for i = first_rid, #ARGV do
  if redis.call('ZREM', rk, ARGV[i]) == 1 then
    local index = KEYS[i - first_rid + 6]
    local tokens = redis.call('HGET', index, wid)
    if tokens then freed = freed + tonumber(tokens) else lost = true end
    redis.call('HDEL', index, wid)
    dropped = dropped + 1
  end
end
give_back(wk, rk, wid, dropped, freed, lost)
local pending = redis.call('HMGET', wk, 'pending_count', 'pending_tokens')  -- after the expiry and the drops
fields[#fields + 1] = 'status_version'
fields[#fields + 1] = version
fields[#fields + 1] = 'pending_count'
fields[#fields + 1] = pending[1] or '0'
fields[#fields + 1] = 'pending_tokens'
fields[#fields + 1] = pending[2] or '0'
fields[#fields + 1] = 'w'
fields[#fields + 1] = wid
stream_add(KEYS[4], KEYS[5], 's', fields)
redis.call('PUBLISH', ARGV[3], 'status ' .. wid .. ' ' .. version)
return {1, dropped, version}
