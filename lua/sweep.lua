-- sweep: expire the overdue reservations of some workers (the master's periodic clean-up, or any process's while
-- no one holds the master lock, for workers nobody schedules on, whose reservations no reserve call expires).
-- KEYS[1], KEYS[2] the change stream and its entry counter
-- KEYS[3..]        2 keys per worker: status hash, reservations zset
-- ARGV             worker id per KEYS pair
-- Returns the number of reservations expired; a 'p' stream entry carries the new pending load of those workers.
-- @include _lib.lua
local now = now_ms()
local expired, changes = 0, {}
for i = 1, (#KEYS - 2) / 2 do
  local wk = KEYS[2 * i + 1]
  local here = expire_reservations(wk, KEYS[2 * i + 2], ARGV[i], now)
  if here > 0 then
    expired = expired + here
    changes[#changes + 1] = ARGV[i]
    changes[#changes + 1] = pending_of(wk)
  end
end
if #changes > 0 then stream_add(KEYS[1], KEYS[2], 'p', changes) end
return expired
