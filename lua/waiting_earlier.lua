-- waiting_earlier: other routers' live waiters that rank before a bound, in board order; marks this router alive.
-- KEYS[1], KEYS[2] the board and the routers with waiters, as in waiting_enter.lua
-- ARGV[1]          this router
-- ARGV[2]          lease ms: the waiters of a router not seen for this long are dropped from the board
-- ARGV[3]          rank bound: only waiters that rank before it
-- ARGV[4]          limit: at most this many read (the best-ranked: the ones that matter)
-- Returns {member, rank, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local out = {}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'WITHSCORES', 'LIMIT', 0, ARGV[4])
for i = 1, #rows, 2 do
  local router = string.match(rows[i], '^([^|]*)|')
  if router ~= ARGV[1] then
    local seen = tonumber(redis.call('ZSCORE', KEYS[2], router))
    if seen and seen >= now - tonumber(ARGV[2]) then
      out[#out + 1] = rows[i]
      out[#out + 1] = rows[i + 1]
    else
      redis.call('ZREM', KEYS[1], rows[i])
    end
  end
end
return out
