-- remove_worker: drop a worker with everything it owns.
-- KEYS[1]          members version
-- KEYS[2..5]       role sets of PREFILL, DECODE, PDFUSION, VIT
-- KEYS[6..9]       the worker's status hash, reservations zset, reservation tokens hash, cache block set
-- ARGV[1]          worker id
-- Returns 1 if the worker existed, else 0.
-- Guarantees: membership and the worker's keys go together; requests still indexed to it release as no-ops.
-- @include _lib.lua

local removed = 0
for i = 2, 5 do removed = removed + redis.call('SREM', KEYS[i], ARGV[1]) end
local existed = redis.call('DEL', KEYS[6], KEYS[7], KEYS[8], KEYS[9])
if removed > 0 then bump_members_version(KEYS[1]) end
if removed > 0 or existed > 0 then return 1 end
return 0
