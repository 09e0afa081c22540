-- Shared helpers, pasted by the loader in place of "-- @include _lib.lua" (not a script of its own).

-- Redis server time in ms: one clock for every router host, so TTLs do not depend on their clocks.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The change stream: every write that changes what a router's fleet view holds appends one entry, so routers tail
-- the stream instead of reading every worker. Entries are {t, kind, n, seq, field, value, ...}: kind 's' (status
-- fields of worker w), 'a' (worker w registered or updated, with its role), 'r' (worker w removed), 'p' (pending
-- load: field = worker id, value = "pending_count pending_tokens"; a reservation's entry also has '+i' = "worker
-- until_ms cap block ...", the blocks it put in flight), 'k' (the blocks of prefill-type worker w changed: op 'd' with
-- 'add' and 'del' (space-separated hashes), or op 'l': read its sets again). n grows by one per entry, so a reader that sees
-- a jump knows it missed entries (trimmed stream, Redis restarted empty) and reads the fleet again.
local STREAM_MAXLEN = 20000
local function stream_add(stream_key, seq_key, kind, fields)
  local n = redis.call('INCR', seq_key)
  redis.call('XADD', stream_key, 'MAXLEN', '~', STREAM_MAXLEN, '*', 't', kind, 'n', n, unpack(fields))
end

-- The 'k' entry of a change to a prefill-type worker's blocks: the diff itself when it is small, else 'l' (the
-- routers' mirrors read the worker's sets again: one large entry per poll would fill the stream).
local MAX_DIFF_IN_STREAM = 512
local function blocks_changed(stream_key, seq_key, wid, added, removed)
  if #added + #removed > MAX_DIFF_IN_STREAM then
    stream_add(stream_key, seq_key, 'k', {'w', wid, 'op', 'l'})
  elseif #added + #removed > 0 then
    stream_add(stream_key, seq_key, 'k', {'w', wid, 'op', 'd', 'add', table.concat(added, ' '),
      'del', table.concat(removed, ' ')})
  end
end

-- HINCRBY with a Lua number: never '-0' (Lua 5.1 formats negative zero so, and HINCRBY refuses it).
local function hincr(key, field, delta)
  if delta ~= 0 then redis.call('HINCRBY', key, field, string.format('%d', delta)) end
end

-- "pending_count pending_tokens" of a worker's status hash: the value of a 'p' stream entry.
local function pending_of(worker_key)
  local p = redis.call('HMGET', worker_key, 'pending_count', 'pending_tokens')
  return (p[1] or '0') .. ' ' .. (p[2] or '0')
end

-- Add to a worker's pending load (the caller knows the worker exists) and return the new "count tokens".
local function add_pending(worker_key, count, tokens)
  local c = redis.call('HINCRBY', worker_key, 'pending_count', string.format('%d', count))
  local t = redis.call('HINCRBY', worker_key, 'pending_tokens', string.format('%d', tokens))
  return c .. ' ' .. t
end

-- The prefix of the request indexes ("flexlb:{svc}:req:") from a worker's status hash key
-- ("flexlb:{svc}:worker:<wid>").
local function request_prefix(worker_key, wid)
  return string.sub(worker_key, 1, #worker_key - #wid - 7) .. 'req:'
end

-- A reservation's tokens live in its request's index only (req:<rid>, field: the worker id), which outlives the
-- reservation by a minute (reserve.lua). When one is missing (an expiry that ran later than that, an eviction), the
-- worker's pending tokens are counted again from the reservations it has left; returns the new count.
local function recount_pending_tokens(worker_key, resv_key, req_prefix, wid)
  local held = 0
  for _, rid in ipairs(redis.call('ZRANGE', resv_key, 0, -1)) do
    held = held + (tonumber(redis.call('HGET', req_prefix .. rid, wid)) or 0)
  end
  redis.call('HSET', worker_key, 'pending_tokens', string.format('%d', held))
  return held
end

-- Give back the load of `count` reservations of worker `wid` already removed from its zset: `freed` tokens as their
-- indexes held them, or, when an index had lost its field (`lost`), the worker's tokens counted again. Returns the
-- tokens given back.
local function give_back(worker_key, resv_key, wid, count, freed, lost)
  hincr(worker_key, 'pending_count', -count)
  if not lost then
    hincr(worker_key, 'pending_tokens', -freed)
    return freed
  end
  local before = tonumber(redis.call('HGET', worker_key, 'pending_tokens')) or 0
  return before - recount_pending_tokens(worker_key, resv_key, request_prefix(worker_key, wid), wid)
end

-- Drop the reservations of worker `wid` whose expiry has passed and give their load back.
-- A router that crashed never releases; this is what returns its capacity. Returns how many were dropped and
-- their tokens.
local function expire_reservations(worker_key, resv_key, wid, now)
  local overdue = redis.call('ZRANGEBYSCORE', resv_key, '-inf', now)
  if #overdue == 0 then return 0, 0 end
  local req_prefix = request_prefix(worker_key, wid)
  local freed, lost = 0, false
  for _, rid in ipairs(overdue) do
    local tokens = redis.call('HGET', req_prefix .. rid, wid)
    if tokens then freed = freed + tonumber(tokens) else lost = true end
  end
  redis.call('ZREM', resv_key, unpack(overdue))
  if redis.call('EXISTS', worker_key) == 1 then freed = give_back(worker_key, resv_key, wid, #overdue, freed, lost) end
  return #overdue, freed
end

-- Only these roles' blocks are in the inverted index: only their cache hits matter to a decision.
local INDEXED_ROLES = {PREFILL = true, PDFUSION = true}

-- In-flight blocks: a request's blocks reserved on a prefill-type worker, not yet in the worker's own cache report;
-- "flexlb:{svc}:inflight:<wid>" is a zset block -> expiry ms. The inverted index names the worker for the first of a
-- request's in-flight blocks only (its head), so a burst of one new prefix finds where the first request of it went;
-- "flexlb:{svc}:inflight_heads:<wid>" (head -> expiry ms) says which index entries expire with them. Both keys are
-- named from the block keys' prefix ("flexlb:{svc}:blk:"): the same hash slot.
local function inflight_key(block_prefix, wid)
  return string.sub(block_prefix, 1, -5) .. 'inflight:' .. wid
end

local function inflight_heads_key(block_prefix, wid)
  return string.sub(block_prefix, 1, -5) .. 'inflight_heads:' .. wid
end

-- Remove `heads` from a worker's in-flight heads zset `hk`; each leaves the inverted index unless the worker's own
-- cache set holds it.
local function drop_heads(hk, heads, block_prefix, cache_key, wid)
  if #heads == 0 then return end
  local held = redis.call('SMISMEMBER', cache_key, unpack(heads))
  for i, block in ipairs(heads) do
    if held[i] == 0 then redis.call('SREM', block_prefix .. block, wid) end
  end
  redis.call('ZREM', hk, unpack(heads))
end

-- Drop a worker's in-flight blocks whose expiry passed, at most `limit` of each kind: the expired heads leave the
-- inverted index unless the worker's own cache set holds them, and the other blocks (never in the index for being
-- in flight) go by rank, in C, without a Lua value per block. Returns how many heads were dropped.
local function expire_inflight(block_prefix, cache_key, wid, now, limit)
  local hk = inflight_heads_key(block_prefix, wid)
  local due = redis.call('ZRANGEBYSCORE', hk, '-inf', now, 'LIMIT', 0, limit)
  drop_heads(hk, due, block_prefix, cache_key, wid)
  local ik = inflight_key(block_prefix, wid)
  local over = redis.call('ZRANGEBYSCORE', ik, '-inf', now, 'LIMIT', limit - 1, 1)
  if #over > 0 then  -- more than `limit` are due: the `limit` lowest (all due); the rest go on later calls
    redis.call('ZREMRANGEBYRANK', ik, 0, limit - 1)
  else
    redis.call('ZREMRANGEBYSCORE', ik, '-inf', now)
  end
  return #due
end

-- Keep at most `cap` in-flight blocks (and heads) of a worker, the oldest (soonest to expire) dropped first; a
-- dropped head leaves the inverted index unless the worker's cache set holds it (at most `limit` heads per call).
local function trim_inflight(block_prefix, cache_key, wid, cap, limit)
  local ik, hk = inflight_key(block_prefix, wid), inflight_heads_key(block_prefix, wid)
  local over = redis.call('ZCARD', ik) - cap
  if over > 0 then redis.call('ZREMRANGEBYRANK', ik, 0, over - 1) end
  over = math.min(redis.call('ZCARD', hk) - cap, limit)
  if over > 0 then drop_heads(hk, redis.call('ZRANGE', hk, 0, over - 1), block_prefix, cache_key, wid) end
end

-- Add every block a worker holds to the inverted index (its role became one that is indexed).
local function index_blocks(cache_key, block_prefix, wid)
  local blocks = redis.call('SMEMBERS', cache_key)
  for _, block in ipairs(blocks) do redis.call('SADD', block_prefix .. block, wid) end
  return #blocks
end

-- Remove a worker from the inverted block index (block hash -> workers) and drop its own block set and its
-- in-flight blocks.
-- block_prefix is the block keys' common prefix ("flexlb:{svc}:blk:"): the keys are named from the worker's set.
local function unindex_blocks(cache_key, block_prefix, wid, keep_set)
  local blocks = redis.call('SMEMBERS', cache_key)
  for _, block in ipairs(blocks) do redis.call('SREM', block_prefix .. block, wid) end
  if not keep_set then redis.call('DEL', cache_key) end
  -- and its in-flight blocks: none survive the worker's removal (rare: every block is asked, heads or not)
  for _, key in ipairs({inflight_heads_key(block_prefix, wid), inflight_key(block_prefix, wid)}) do
    for _, block in ipairs(redis.call('ZRANGE', key, 0, -1)) do redis.call('SREM', block_prefix .. block, wid) end
    redis.call('DEL', key)
  end
  return #blocks
end

-- Give membership a new version: the server time in microseconds, or one more than the current version if that is
-- larger. Never a value a router may have cached before, even after Redis lost the key (restart without persistence,
-- failover), which a plain counter restarting at 1 would reuse.
local function bump_members_version(version_key)
  local t = redis.call('TIME')
  local v = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), (tonumber(redis.call('GET', version_key)) or 0) + 1)
  redis.call('SET', version_key, string.format('%.0f', v))
end

-- The epoch of a new master term: the server time in ms, or one more than the current epoch if that is larger; stored
-- and returned as an integer string. Strictly above every earlier epoch, and, unlike a counter restarting at 1, not one
-- an old master may still hold after Redis lost the key (restart without persistence, failover), unless the server
-- clock went back by more than the time since that master's election. Milliseconds stay far below 2^53 (exact in Lua).
local function next_epoch(epoch_key)
  local t = redis.call('TIME')
  local v = math.max(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
    (tonumber(redis.call('GET', epoch_key)) or 0) + 1)
  local epoch = string.format('%.0f', v)
  redis.call('SET', epoch_key, epoch)
  return epoch
end

-- The master lock's value "token|epoch|holder" split into its parts (the holder may itself contain '|').
local function parse_lock(value)
  local token, epoch, holder = string.match(value, '^([^|]*)|([^|]*)|(.*)$')
  return token, tonumber(epoch), holder
end

-- Fencing: true only when the master epoch key holds exactly `epoch` (and that current value, for messages).
-- Every master write checks it in the same script as the write, so a master that was paused past its TTL, and has
-- been replaced since, cannot write with its old epoch even before it notices it lost the lock.
local function check_epoch(epoch_key, epoch)
  local current = redis.call('GET', epoch_key)
  return current ~= false and current == tostring(epoch), current
end
