-- upsert_worker: register a worker or update its identity and status fields.
-- KEYS[1]          members version
-- KEYS[2..5]       role sets of PREFILL, DECODE, PDFUSION, VIT
-- KEYS[6]          the worker's status hash
-- KEYS[7], KEYS[8] the change stream and its entry counter
-- KEYS[9]          the worker's cache block set
-- ARGV[1]          worker id
-- ARGV[2]          role (one of the four), or '' to keep the current one
-- ARGV[3]          '1' to create when missing, '0' to refuse an unknown worker
-- ARGV[4]          prefix of the inverted index's block keys ("flexlb:{svc}:blk:"; same hash slot as KEYS)
-- ARGV[5..]        field, value pairs to set
-- Returns {1, members_changed} or {0, reason}.
-- Guarantees: a worker is in exactly one role set; the members version moves whenever membership does, and when
-- what the master polls it by changes (engine, grpc_port, kv_events, kv_events_replay), so it follows the new ones;
-- status_version grows by one and updated_ms is server time on every write; an 'a' stream entry carries the
-- fields written with the role, status_version and the pending load; a worker whose role changes between a
-- prefill-type one and another enters or leaves the inverted index with the blocks it holds (and a 'k' entry after
-- the 'a' one tells the routers' block mirrors to read it again).
-- @include _lib.lua

local ROLES = {'PREFILL', 'DECODE', 'PDFUSION', 'VIT'}
local POLLED_BY = {engine = true, grpc_port = true, kv_events = true, kv_events_replay = true}
local wid, role, create = ARGV[1], ARGV[2], ARGV[3] == '1'
local exists = redis.call('EXISTS', KEYS[6]) == 1
if not exists and not create then return {0, 'unknown worker ' .. wid} end
local old_role = redis.call('HGET', KEYS[6], 'role')
if role == '' then
  role = old_role
  if not role then return {0, 'worker ' .. wid .. ' has no role; give one'} end
end
local reindexed = (INDEXED_ROLES[old_role or ''] or false) ~= (INDEXED_ROLES[role] or false)
if reindexed then
  if INDEXED_ROLES[role] then index_blocks(KEYS[9], ARGV[4], wid) else unindex_blocks(KEYS[9], ARGV[4], wid, true) end
end
local changed = 0
for i, name in ipairs(ROLES) do
  if name == role then
    changed = changed + redis.call('SADD', KEYS[1 + i], wid)
  else
    changed = changed + redis.call('SREM', KEYS[1 + i], wid)
  end
end
local fields = {'role', role, 'updated_ms', now_ms()}
local events_moved = false
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
for i = 5, #ARGV - 1, 2 do
  if POLLED_BY[ARGV[i]] and exists then
    events_moved = events_moved or (redis.call('HGET', KEYS[6], ARGV[i]) or '') ~= ARGV[i + 1]
  end
end
redis.call('HSET', KEYS[6], unpack(fields))
local version = redis.call('HINCRBY', KEYS[6], 'status_version', 1)
if not exists then
  redis.call('HSETNX', KEYS[6], 'pending_count', 0)
  redis.call('HSETNX', KEYS[6], 'pending_tokens', 0)
end
if changed > 0 or events_moved then bump_members_version(KEYS[1]) end
local pending = redis.call('HMGET', KEYS[6], 'pending_count', 'pending_tokens')
fields[#fields + 1] = 'status_version'
fields[#fields + 1] = version
fields[#fields + 1] = 'pending_count'
fields[#fields + 1] = pending[1]
fields[#fields + 1] = 'pending_tokens'
fields[#fields + 1] = pending[2]
fields[#fields + 1] = 'w'
fields[#fields + 1] = wid
stream_add(KEYS[7], KEYS[8], 'a', fields)
-- a new worker holds no blocks yet (its sets went with its removal): nothing for the mirrors to read
if reindexed and (exists or redis.call('EXISTS', KEYS[9]) == 1) then
  stream_add(KEYS[7], KEYS[8], 'k', {'w', wid, 'op', 'l'})
end
return {1, changed}
