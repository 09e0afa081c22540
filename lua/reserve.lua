-- reserve: reserve capacity for one request on one worker per role, all of them or none.
-- KEYS[1]          the request's index hash (worker id -> reserved tokens): what release and expiry give back, so
--                  release needs only the request id
-- KEYS[2], KEYS[3] the change stream and its entry counter
-- KEYS[4..]        2 keys per worker: status hash, reservations zset (request id -> expiry ms)
-- ARGV[1]          request id
-- ARGV[2]          TTL of the reservations in ms
-- ARGV[3]          TTL of in-flight blocks in ms (0: none are recorded)
-- ARGV[4]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- ARGV[5]          probe: the request's first block that no worker held at the caller's lookup, or ''
-- ARGV[6]          '1': admission by wait (the proxy's): the concurrency and KV limits are not checked, a worker at
--                  them queues the request; '0': they are (the schedule API)
-- ARGV[7]          CAP: most in-flight blocks that worker keeps, the oldest dropped first (0: no bound)
-- ARGV[8]          B, the number of in-flight blocks
-- ARGV[9..8+B]     the request's blocks the first prefill-type worker does not hold yet, in prompt order
-- ARGV[9+B..]      2 values per worker, in KEYS order: worker id, tokens to reserve
-- Returns {1, now_ms, "pending_count pending_tokens" of each worker after the reservation} when every worker was
-- reserved, else {0, i, reason, detail, {values of CHECKED}} for the first worker i (1-based) that refused; reason
-- is one of gone, not_alive, concurrency_full, kv_full, or prefix_moved: since the caller's lookup, the probe block
-- became held (in flight) somewhere - another request of the same new prefix was placed meanwhile, so the caller's
-- hits and tokens are out of date: it looks up again and decides with them (only once: it sends no probe then). On refusal nothing is written but the expiry of overdue
-- reservations, so an earlier role's worker is left exactly as it was. Either way the routers' views learn what
-- was seen: a 'p' stream entry of the new pending load, and the refused worker's values for the caller.
-- Guarantees: the check and the write are one atomic step, so no router can push a worker over max_concurrency or
-- its KV total; re-reserving a request id already held on a worker refreshes its expiry without counting it twice.
-- On success the B blocks become in-flight on the first prefill-type (PREFILL, PDFUSION) worker, the first of them (the
-- head, also in its inflight_heads zset) in the inverted index: held by it until its own cache report confirms them or ARGV[3] ms pass (lua/lookup.lua,
-- lua/master_cache.lua); the 'p' stream entry names them ('+i') for the routers' block mirrors.
-- Touches only the workers named: never the rest of the fleet.
-- @include _lib.lua

local CHECKED = {'alive', 'max_concurrency', 'running', 'waiting', 'pending_count', 'kv_total', 'kv_used',
                 'pending_tokens', 'role', 'resv_check', 'inflight_check'}
local rid = ARGV[1]
local ttl = tonumber(ARGV[2])
local inflight_ttl, block_prefix, probe, nblocks = tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[8])
local limits, cap = ARGV[6] ~= '1', tonumber(ARGV[7])
local base = 8 + nblocks  -- ARGV[base + 2i - 1], ARGV[base + 2i]: worker i's id and tokens
local probed = probe == ''  -- only the first prefill-type worker is probed
local now = now_ms()
local n = (#KEYS - 3) / 2
-- A worker's overdue reservations are looked for at most this often ('resv_check' in its hash: when next), or at
-- once when its load would refuse the request: every call searching them was 2 of the ~40 redis.calls a decision
-- makes, each ~3 us of server time; an overdue reservation counting a little longer only ever delays, and only
-- until the check it triggers.
local CHECK_MS = math.min(1000, math.floor(ttl / 4))
-- Expired in-flight blocks likewise ('inflight_check'): lookups and the routers' mirrors compare their expiry with
-- the clock themselves, so removing them late only keeps them in memory a little longer (at most CAP of them).
local INFLIGHT_CHECK_MS = math.min(1000, math.floor(inflight_ttl / 4))

local function num(v) return tonumber(v) or 0 end

local seen, expired, checked = {}, {}, {}

-- Expire worker i's overdue reservations now and correct its values read before (s) to after.
local function expire_now(i, s)
  checked[i] = true
  local dropped, freed = expire_reservations(KEYS[2 * i + 2], KEYS[2 * i + 3], ARGV[base + 2 * i - 1], now)
  if dropped > 0 then
    s[5], s[8] = tostring(num(s[5]) - dropped), tostring(num(s[8]) - freed)
    expired[#expired + 1] = ARGV[base + 2 * i - 1]
    expired[#expired + 1] = s[5] .. ' ' .. s[8]
  end
end

-- Why worker i (values s) cannot take `tokens` more, or nil.
local function over_limits(s, tokens)
  if s[1] ~= '1' then return 'not_alive', 'worker is not alive' end
  if not limits then return nil end
  local limit, load = num(s[2]), num(s[3]) + num(s[4]) + num(s[5])
  if limit > 0 and load + 1 > limit then return 'concurrency_full', 'load ' .. load .. ' of max ' .. limit end
  local kv_total, kv_taken = num(s[6]), num(s[7]) + num(s[8])
  if kv_total > 0 and kv_taken + tokens > kv_total then
    return 'kv_full', 'needs ' .. tokens .. ' tokens, ' .. (kv_total - kv_taken) .. ' free'
  end
end

for i = 1, n do
  local tokens = tonumber(ARGV[base + 2 * i])
  local s = redis.call('HMGET', KEYS[2 * i + 2], unpack(CHECKED))
  if not s[9] then
    if #expired > 0 then stream_add(KEYS[2], KEYS[3], 'p', expired) end
    return {0, i, 'gone', 'worker is not registered', {}}
  end
  if now >= num(s[10]) then expire_now(i, s) end
  seen[i] = s
  local refusal, detail = over_limits(s, tokens)
  if refusal and refusal ~= 'not_alive' and not checked[i] then
    expire_now(i, s)
    refusal, detail = over_limits(s, tokens)
  end
  if not refusal and not probed and INDEXED_ROLES[s[9]] then
    probed = true
    local probe_key = block_prefix .. probe
    if redis.call('EXISTS', probe_key) == 1 then
      refusal = 'prefix_moved'
      detail = 'its new blocks are held by ' .. table.concat(redis.call('SRANDMEMBER', probe_key, 4), ',')
    end
  end
  -- a request already holding this worker (a retry) is counted in its load: it is not checked again
  if refusal and redis.call('ZSCORE', KEYS[2 * i + 3], rid) == false then
    if #expired > 0 then stream_add(KEYS[2], KEYS[3], 'p', expired) end
    s[10] = nil
    return {0, i, refusal, detail, s}
  end
end

local expiry = now + ttl
local out, changes = {1, now}, {}
local prefill_seen = false
local inflight_note, inflight_checked
local request_index = {}  -- KEYS[1]'s new fields: worker id -> tokens, of the new reservations
for i = 1, n do
  local wk, rk = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local wid, tokens = ARGV[base + 2 * i - 1], tonumber(ARGV[base + 2 * i])
  if not prefill_seen and INDEXED_ROLES[seen[i][9]] then
    prefill_seen = true
    local cache_key = string.sub(block_prefix, 1, -5) .. 'cache:' .. wid
    if now >= num(seen[i][11]) then
      expire_inflight(block_prefix, cache_key, wid, now, 64)  -- bounded: the rest go on later calls
      inflight_checked = i
    end
    if nblocks > 0 and inflight_ttl > 0 then
      local scored, until_ms = {}, now + inflight_ttl
      for b = 9, base do
        scored[#scored + 1] = until_ms
        scored[#scored + 1] = ARGV[b]
      end
      redis.call('ZADD', inflight_key(block_prefix, wid), unpack(scored))
      -- the index names the worker for the first of them only: a lookup reaches a worker from the request's first
      -- block (cached or in flight there) and reads the rest from its in-flight set, so one SADD per request, and
      -- that head alone is what the index loses when they expire
      redis.call('SADD', block_prefix .. ARGV[9], wid)
      redis.call('ZADD', inflight_heads_key(block_prefix, wid), until_ms, ARGV[9])
      if cap > 0 then trim_inflight(block_prefix, cache_key, wid, cap, 64) end
      inflight_note = wid .. ' ' .. string.format('%.0f', until_ms) .. ' ' .. cap .. ' ' .. table.concat(ARGV, ' ', 9, base)
    end
  end
  local pending
  if redis.call('ZADD', rk, expiry, rid) == 1 then
    request_index[#request_index + 1] = wid
    request_index[#request_index + 1] = tokens
    -- the values read above plus this reservation (the script is atomic): one HSET instead of two HINCRBY
    local count, held = string.format('%d', num(seen[i][5]) + 1), string.format('%d', num(seen[i][8]) + tokens)
    local fields = {'pending_count', count, 'pending_tokens', held}
    if checked[i] then fields[#fields + 1], fields[#fields + 2] = 'resv_check', now + CHECK_MS end
    if inflight_checked == i then fields[#fields + 1], fields[#fields + 2] = 'inflight_check', now + INFLIGHT_CHECK_MS end
    redis.call('HSET', wk, unpack(fields))
    pending = count .. ' ' .. held
  else  -- already held: its expiry moved, its load is counted
    pending = (seen[i][5] or '0') .. ' ' .. (seen[i][8] or '0')
    if inflight_checked == i then redis.call('HSET', wk, 'inflight_check', now + INFLIGHT_CHECK_MS) end
  end
  out[#out + 1] = pending
  changes[#changes + 1] = wid
  changes[#changes + 1] = pending
end
if inflight_note then  -- for the routers' block mirrors (flexlb/state/block_mirror.py)
  changes[#changes + 1] = '+i'
  changes[#changes + 1] = inflight_note
end
stream_add(KEYS[2], KEYS[3], 'p', changes)
if #request_index > 0 then redis.call('HSET', KEYS[1], unpack(request_index)) end
-- the index outlives the reservations a little: a late release finds them gone, not unknown, and an expiry finds
-- their tokens (lua/_lib.lua expire_reservations)
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
return out
