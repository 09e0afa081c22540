-- batch: several reserve / release calls of one service in one script call. Each call runs as its own script would,
-- in order; they share one clock read and one change-stream entry. Most of a decision's Redis time is the scripts'
-- own cost (the call, the clock, the stream entry), not their commands (docs/performance.md).
-- KEYS             the calls' keys, one call's after the other's; every call's KEYS[2], KEYS[3] (the change stream and
--                  its entry counter) are the same: one service, one hash slot
-- ARGV[1]          N, the number of calls
-- ARGV[2..1+3N]    per call: its script ('reserve' or 'release'), its number of keys, its number of arguments
-- ARGV[2+3N..]     the calls' arguments, one call's after the other's
-- Returns one reply per call, in order: what its script returns, or {'__error__', message} when it raised (the calls
-- before it keep their writes, as separate scripts would have); a call that met its slot in transit ends the list
-- with {'__moved__', message}: it and the calls after it are for the client to send again.
-- The calls' 'p' stream entries become one (each worker's last value; in-flight notes as '+i', '+i2', ...).
-- The loader puts each script's text after its '-- @body' line, inside a function of (KEYS, ARGV).
-- @include _lib.lua

local clock_ms, append_entry = now_ms, stream_add  -- _lib.lua's, under the names the calls' own take below
local clock
local function now_ms()  -- one clock read for the whole batch: the calls are one atomic step
  clock = clock or clock_ms()
  return clock
end

local merged, notes = {}, 0
local function stream_add(stream_key, seq_key, kind, fields)  -- kind 'p': the two scripts' only entries
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == '+i' then
      notes = notes + 1
      if notes > 1 then name = '+i' .. notes end
    end
    merged[#merged + 1] = name
    merged[#merged + 1] = fields[i + 1]
  end
end

-- A cluster error (flexlb/state/errors.py): the slot is migrating or the cluster is down. A script of its own would
-- stop with it, and the client would follow the redirection and call again; so do the calls from this one on.
local function in_transit(message)
  for _, marker in ipairs({'non local key', 'cluster is down', 'MOVED', 'ASK', 'TRYAGAIN', 'CLUSTERDOWN'}) do
    if string.find(message, marker, 1, true) then return true end
  end
  return false
end

-- @body reserve
-- @body release

local bodies = {reserve = reserve, release = release}
local n = tonumber(ARGV[1])
local k, a = 0, 1 + 3 * n
local out = {}
for c = 1, n do
  local body = bodies[ARGV[3 * c - 1]]
  local nk, na = tonumber(ARGV[3 * c]), tonumber(ARGV[3 * c + 1])
  local ok, reply = pcall(body, {unpack(KEYS, k + 1, k + nk)}, {unpack(ARGV, a + 1, a + na)})
  if not ok then
    local message = type(reply) == 'table' and (reply.err or 'error') or tostring(reply)
    if in_transit(message) then  -- the slot is moving: this call and the rest go again after the redirection
      if c == 1 then error(reply) end  -- nothing ran before it: the script's own error, as a lone script's
      out[c] = {'__moved__', message}
      break
    end
    reply = {'__error__', message}
  end
  out[c] = reply
  k, a = k + nk, a + na
end
if #merged > 0 then append_entry(KEYS[2], KEYS[3], 'p', merged) end
return out
