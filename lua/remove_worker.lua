-- remove_worker: drop a worker with everything it owns.
-- KEYS[1]          members version
-- KEYS[2..5]       role sets of PREFILL, DECODE, PDFUSION, VIT
-- KEYS[6..8]       the worker's status hash, reservations zset, cache block set
-- KEYS[9], KEYS[10] the change stream and its entry counter
-- ARGV[1]          worker id
-- ARGV[2]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- Returns 1 if the worker existed, else 0.
-- Guarantees: membership and the worker's keys go together, and the worker leaves every block of the inverted
-- index; an 'r' stream entry tells the routers; requests still indexed to it release as no-ops.
-- @include _lib.lua

local removed = 0
for i = 2, 5 do removed = removed + redis.call('SREM', KEYS[i], ARGV[1]) end
unindex_blocks(KEYS[8], ARGV[2], ARGV[1])
local existed = redis.call('DEL', KEYS[6], KEYS[7])
if removed > 0 then bump_members_version(KEYS[1]) end
if removed > 0 or existed > 0 then
  stream_add(KEYS[9], KEYS[10], 'r', {'w', ARGV[1]})
  return 1
end
return 0
