-- sweep: expire the overdue reservations of some workers (a router's or the master's periodic clean-up, for
-- workers nobody schedules on and so nobody reads).
-- KEYS             3 keys per worker: status hash, reservations zset, reservation tokens hash
-- Returns the number of reservations expired.
-- @include _lib.lua
local now = now_ms()
local expired = 0
for k = 1, #KEYS, 3 do
  expired = expired + expire_reservations(KEYS[k], KEYS[k + 1], KEYS[k + 2], now)
end
return expired
