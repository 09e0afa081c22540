-- snapshot: the state of the workers of some roles and each one's cached prefix of a request, in one round trip.
-- KEYS[1]          members version (changes whenever a worker joins, leaves or changes role)
-- KEYS[2..1+R]     the role sets of every role, in the store's fixed order (R = ARGV[2]); returned when stale
-- KEYS[2+R..]      4 keys per worker, in the caller's member order: status hash, reservations zset,
--                  reservation tokens hash, cache block set
-- ARGV[1]          members version the caller built KEYS from
-- ARGV[2]          R
-- ARGV[3..]        the request's block cache keys, in prompt order
-- Returns {0, version, {ids of role 1}, {ids of role 2}, ...} when the caller's membership is stale (KEYS would
-- be wrong), else {1, now_ms, {values of FIELDS below, hit_blocks}, ...} per worker.
-- Guarantees: overdue reservations are expired before the numbers are read, so pending counts are exact;
-- hit_blocks is a strict prefix match: blocks match in order from the first and the first miss ends the match.
-- @include _lib.lua

-- The status hash fields returned, in this order: flexlb/state/codec.py SNAPSHOT_FIELDS must list the same.
local FIELDS = {'ip', 'http_port', 'grpc_port', 'role', 'group', 'max_concurrency', 'alive', 'available', 'running', 'waiting',
                'queued_tokens', 'kv_used', 'kv_total', 'block_size', 'step_latency_ms', 'prefill_tokens_per_ms',
                'status_version', 'updated_ms', 'pending_count', 'pending_tokens'}

local r = tonumber(ARGV[2])
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= ARGV[1] then
  local out = {0, version}
  for i = 1, r do out[#out + 1] = redis.call('SMEMBERS', KEYS[1 + i]) end
  return out
end

local CHUNK = 32  -- most prompts miss early: look blocks up in chunks, not all at once
local function cached_prefix(cache_key)
  local last = #ARGV
  if last < 3 or redis.call('EXISTS', cache_key) == 0 then return 0 end
  local n, i = 0, 3
  while i <= last do
    local j = math.min(i + CHUNK - 1, last)
    local hits = redis.call('SMISMEMBER', cache_key, unpack(ARGV, i, j))
    for k = 1, #hits do
      if hits[k] == 0 then return n end
      n = n + 1
    end
    i = j + 1
  end
  return n
end

local now = now_ms()
local out = {1, now}
for k = 2 + r, #KEYS, 4 do
  expire_reservations(KEYS[k], KEYS[k + 1], KEYS[k + 2], now)
  out[#out + 1] = {redis.call('HMGET', KEYS[k], unpack(FIELDS)), cached_prefix(KEYS[k + 3])}
end
return out
