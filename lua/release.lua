-- release: give back a request's reservations (request finished or failed, or rollback of earlier roles).
-- KEYS[1]          the request's index hash (worker id -> reserved tokens)
-- KEYS[2], KEYS[3] the change stream and its entry counter
-- KEYS[4..]        2 keys per worker: status hash, reservations zset
-- ARGV[1]          request id
-- ARGV[2..]        worker id per KEYS pair
-- Returns {reservations removed, workers still in the request's index} (the caller releases those too when it
-- wanted every reservation of the request but knew only some of its workers). When something was removed, a 'p'
-- stream entry carries the workers' new pending load: routers waiting for capacity wake up on it
-- (flexlb/state/events.py).
-- Guarantees: exactly once per (request, worker): a second release, or a release after expiry, changes nothing;
-- a worker removed meanwhile is not re-created; a 0-token reservation releases like any other.
-- @include _lib.lua

local rid = ARGV[1]
local released = 0
local changes = {}
local held = #ARGV > 1 and redis.call('HMGET', KEYS[1], unpack(ARGV, 2)) or {}  -- each worker's reserved tokens
for i = 1, (#KEYS - 3) / 2 do
  local wk, rk = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local wid = ARGV[1 + i]
  -- a reservation still in the zset means the worker is still registered: remove_worker.lua deletes the zset with
  -- the worker's hash, so the pending counts below never re-create a removed worker
  if redis.call('ZREM', rk, rid) == 1 then
    changes[#changes + 1] = wid
    if held[i] then
      changes[#changes + 1] = add_pending(wk, -1, -tonumber(held[i]))
    else  -- its index lost the field (evicted)
      give_back(wk, rk, wid, 1, 0, true)
      changes[#changes + 1] = pending_of(wk)
    end
    released = released + 1
  end
end
if #ARGV > 1 then redis.call('HDEL', KEYS[1], unpack(ARGV, 2)) end
if #changes > 0 then stream_add(KEYS[2], KEYS[3], 'p', changes) end
return {released, redis.call('HLEN', KEYS[1])}
