-- reserve: reserve capacity for one request on one worker per role, all of them or none.
-- KEYS[1]          the request's index hash (worker id -> reserved tokens), so release needs only the request id
-- KEYS[2..]        3 keys per worker: status hash, reservations zset (request id -> expiry ms),
--                  reservation tokens hash (request id -> tokens)
-- ARGV[1]          request id
-- ARGV[2]          TTL of the reservations in ms
-- ARGV[3..]        2 values per worker, in KEYS order: worker id, tokens to reserve
-- Returns {1, now_ms} when every worker was reserved, else {0, i, reason, detail} for the first worker i (1-based)
-- that refused; reason is one of gone, not_alive, concurrency_full, kv_full. On refusal nothing is written but the
-- expiry of overdue reservations, so an earlier role's worker is left exactly as it was.
-- Guarantees: the check and the write are one atomic step, so no router can push a worker over max_concurrency or
-- its KV total; re-reserving a request id already held on a worker refreshes its expiry without counting it twice.
-- @include _lib.lua

local rid = ARGV[1]
local ttl = tonumber(ARGV[2])
local now = now_ms()
local n = (#KEYS - 1) / 3

local function num(v) return tonumber(v) or 0 end

for i = 1, n do
  local wk, rk, tk = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local tokens = tonumber(ARGV[2 + 2 * i])
  if redis.call('EXISTS', wk) == 0 then return {0, i, 'gone', 'worker is not registered'} end
  expire_reservations(wk, rk, tk, now)
  if redis.call('ZSCORE', rk, rid) == false then
    local s = redis.call('HMGET', wk, 'alive', 'max_concurrency', 'running', 'waiting', 'pending_count',
                         'kv_total', 'kv_used', 'pending_tokens')
    if s[1] ~= '1' then return {0, i, 'not_alive', 'worker is not alive'} end
    local limit, load = num(s[2]), num(s[3]) + num(s[4]) + num(s[5])
    if limit > 0 and load + 1 > limit then
      return {0, i, 'concurrency_full', 'load ' .. load .. ' of max ' .. limit}
    end
    local kv_total, kv_taken = num(s[6]), num(s[7]) + num(s[8])
    if kv_total > 0 and kv_taken + tokens > kv_total then
      return {0, i, 'kv_full', 'needs ' .. tokens .. ' tokens, ' .. (kv_total - kv_taken) .. ' free'}
    end
  end
end

local expiry = now + ttl
for i = 1, n do
  local wk, rk, tk = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local wid, tokens = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  if redis.call('ZADD', rk, expiry, rid) == 1 then
    redis.call('HSET', tk, rid, tokens)
    redis.call('HINCRBY', wk, 'pending_count', 1)
    redis.call('HINCRBY', wk, 'pending_tokens', tokens)
    redis.call('HSET', KEYS[1], wid, tokens)
  end
end
-- the index outlives the reservations a little so a late release still finds them gone, not unknown
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
return {1, now}
