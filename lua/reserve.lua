-- reserve: reserve capacity for one request on one worker per role, all of them or none.
-- KEYS[1]          the request's index hash (worker id -> reserved tokens), so release needs only the request id
-- KEYS[2], KEYS[3] the change stream and its entry counter
-- KEYS[4..]        3 keys per worker: status hash, reservations zset (request id -> expiry ms),
--                  reservation tokens hash (request id -> tokens)
-- ARGV[1]          request id
-- ARGV[2]          TTL of the reservations in ms
-- ARGV[3..]        2 values per worker, in KEYS order: worker id, tokens to reserve
-- Returns {1, now_ms, "pending_count pending_tokens" of each worker after the reservation} when every worker was
-- reserved, else {0, i, reason, detail, {values of CHECKED}} for the first worker i (1-based) that refused; reason
-- is one of gone, not_alive, concurrency_full, kv_full. On refusal nothing is written but the expiry of overdue
-- reservations, so an earlier role's worker is left exactly as it was. Either way the routers' views learn what
-- was seen: a 'p' stream entry of the new pending load, and the refused worker's values for the caller.
-- Guarantees: the check and the write are one atomic step, so no router can push a worker over max_concurrency or
-- its KV total; re-reserving a request id already held on a worker refreshes its expiry without counting it twice.
-- Touches only the workers named: never the rest of the fleet.
-- @include _lib.lua

local CHECKED = {'alive', 'max_concurrency', 'running', 'waiting', 'pending_count', 'kv_total', 'kv_used',
                 'pending_tokens', 'role'}
local rid = ARGV[1]
local ttl = tonumber(ARGV[2])
local now = now_ms()
local n = (#KEYS - 3) / 3

local function num(v) return tonumber(v) or 0 end

local seen, expired = {}, {}
for i = 1, n do
  local wk, rk, tk = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local tokens = tonumber(ARGV[2 + 2 * i])
  local s = redis.call('HMGET', wk, unpack(CHECKED))
  if not s[9] then
    if #expired > 0 then stream_add(KEYS[2], KEYS[3], 'p', expired) end
    return {0, i, 'gone', 'worker is not registered', {}}
  end
  local dropped, freed = expire_reservations(wk, rk, tk, now)
  if dropped > 0 then  -- the values read before the expiry, as they are after it
    s[5], s[8] = tostring(num(s[5]) - dropped), tostring(num(s[8]) - freed)
    expired[#expired + 1] = ARGV[1 + 2 * i]
    expired[#expired + 1] = s[5] .. ' ' .. s[8]
  end
  seen[i] = s
  if redis.call('ZSCORE', rk, rid) == false then
    local refusal, detail
    local limit, load = num(s[2]), num(s[3]) + num(s[4]) + num(s[5])
    local kv_total, kv_taken = num(s[6]), num(s[7]) + num(s[8])
    if s[1] ~= '1' then
      refusal, detail = 'not_alive', 'worker is not alive'
    elseif limit > 0 and load + 1 > limit then
      refusal, detail = 'concurrency_full', 'load ' .. load .. ' of max ' .. limit
    elseif kv_total > 0 and kv_taken + tokens > kv_total then
      refusal, detail = 'kv_full', 'needs ' .. tokens .. ' tokens, ' .. (kv_total - kv_taken) .. ' free'
    end
    if refusal then
      if #expired > 0 then stream_add(KEYS[2], KEYS[3], 'p', expired) end
      return {0, i, refusal, detail, s}
    end
  end
end

local expiry = now + ttl
local out, changes = {1, now}, {}
for i = 1, n do
  local wk, rk, tk = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local wid, tokens = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  local pending
  if redis.call('ZADD', rk, expiry, rid) == 1 then
    redis.call('HSET', tk, rid, tokens)
    redis.call('HSET', KEYS[1], wid, tokens)
    pending = add_pending(wk, 1, tokens)
  else  -- already held: its expiry moved, its load is counted
    pending = (seen[i][5] or '0') .. ' ' .. (seen[i][8] or '0')
  end
  out[#out + 1] = pending
  changes[#changes + 1] = wid
  changes[#changes + 1] = pending
end
stream_add(KEYS[2], KEYS[3], 'p', changes)
-- the index outlives the reservations a little so a late release still finds them gone, not unknown
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
return out
