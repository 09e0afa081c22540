-- waiting_enter: put a request waiting in a router's queue on the fleet's waiting board (flexlb/state/waiting.py).
-- KEYS[1]          the board: zset member "router|request|size" -> rank (priority band * RANK_SCALE + arrival ms)
-- KEYS[2]          the routers with waiters: zset router -> last seen (ms, Redis time)
-- ARGV[1]          this router
-- ARGV[2]          the member to add
-- ARGV[3]          its priority band times RANK_SCALE
-- Returns the arrival (ms, Redis time: one clock for every router).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + now, ARGV[2])
return now
