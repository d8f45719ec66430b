-- Shared by every per-recipient script. All of one recipient's keys share a hash tag, so a
-- script touches one cluster slot.
--
-- KEYS[1] meta       string  (packed doubles) seq (last assigned), live, bytes, lt (loss total), lc (loss
--                          confirmed), touch (last append or ack, ms)
-- KEYS[2] order      zset  member = seq, score = seq
-- KEYS[3] bodies     hash  seq -> record (8-byte sent_at, 16-byte id, body)
-- KEYS[4] deadlines  zset  member = seq, score = expires_at ms (records that expire)
-- KEYS[5] deliveries hash  seq -> times handed to a transport, for records whose count the
--                          meta's delivered watermark does not imply (see `delivery_count`)
-- KEYS[6] dedup      hash  sender-chosen id -> seq
-- KEYS[7] dedup_at   zset  member = id, score = when stored (ms), to forget ids
-- KEYS[8] presence   hash  node id -> presence deadline (server time, ms)
local META, ORDER, BODIES, DEADLINES, DELIVERIES, DEDUP, DEDUP_AT, PRESENCE =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HEADER = 24
local TYPES = {'string', 'zset', 'hash', 'zset', 'hash', 'hash', 'zset', 'hash'}

-- Integers up to 2^53 without Lua 5.1's %.14g rounding ('%d' formats a 64-bit long here,
-- and is much cheaper than '%.0f').
local function s(n) return string.format('%d', n) end

-- The Redis server's clock, in ms: one clock for every node.
local function server_time_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Calls `command key values...` in slices of at most 1000 values (Lua's unpack has a stack
-- limit; 1000 is even, so field-value and score-member pairs stay together). Returns the sum
-- of integer replies.
local function call_chunked(command, key, values)
  local total = 0
  for first = 1, #values, 1000 do
    local last = math.min(first + 1000 - 1, #values)
    local reply = redis.call(command, key, unpack(values, first, last))
    if type(reply) == 'number' then total = total + reply end
  end
  return total
end

-- Refuses to touch keys that hold another type (someone else's data), before any write.
local function wrong_type()
  for i = 1, #KEYS do
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' and t ~= TYPES[i] then
      return redis.error_reply('OQWRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. TYPES[i])
    end
  end
  return nil
end

-- Meta fields: seq, live, bytes, lt, lc, touch; filed (touch as last filed in the idle
-- index) and xi (the deadline last filed in the deadline index, -1 for none) spare an index
-- write on most calls; dl (records with a deadline) and ud (dedup ids held) tell when those
-- keys are created or empty; ttl_at is when the keys' TTLs were last refreshed; dw is the
-- delivered watermark: every record at or below it was handed over at least once.
local FIELDS = {'seq', 'live', 'bytes', 'lt', 'lc', 'touch', 'filed', 'xi', 'dl', 'ud', 'ttl_at', 'dw'}

-- Meta is one string of packed big-endian doubles (exact for integers below 2^53): one GET
-- and one SET, with no number parsing or formatting, which in Lua cost more than the calls.
local PACKING = '>' .. string.rep('d', #FIELDS)

local function load_meta()
  local v = redis.call('GET', META)
  if not v then return nil end
  -- Written before the watermark existed: nothing lies under it (counts are all explicit).
  if #v == 8 * (#FIELDS - 1) then v = v .. struct.pack('>d', 0) end
  -- One constructor, not a loop over FIELDS: a table grown field by field rehashes four
  -- times, which made loading the metadata cost more than the GET.
  local seq, live, bytes, lt, lc, touch, filed, xi, dl, ud, ttl_at, dw = struct.unpack(PACKING, v)
  return {seq = seq, live = live, bytes = bytes, lt = lt, lc = lc, touch = touch, filed = filed,
          xi = xi, dl = dl, ud = ud, ttl_at = ttl_at, dw = dw}
end

local function save_meta(m)
  redis.call('SET', META, struct.pack(PACKING, m.seq, m.live, m.bytes, m.lt, m.lc, m.touch,
    m.filed, m.xi, m.dl, m.ud, m.ttl_at, m.dw), 'KEEPTTL')
end

-- The listed seqs (canonical strings, at most a thousand) that the queue holds, in list order.
-- A compact list is checked with one range read, which replies with members only; a scattered
-- one with ZMSCORE, whose replies are doubles that Redis 7.0 formats at about 0.5 µs each.
local function held_of(seqs)
  if #seqs == 0 then return {} end
  local low, high = math.huge, -math.huge
  for _, seq in ipairs(seqs) do
    local n = tonumber(seq)
    if n < low then low = n end
    if n > high then high = n end
  end
  local held = {}
  if high - low < 2 * #seqs + 16 then
    local present = {}
    for _, seq in ipairs(redis.call('ZRANGEBYSCORE', ORDER, s(low), s(high))) do
      present[seq] = true
    end
    for _, seq in ipairs(seqs) do
      if present[seq] then held[#held + 1] = seq end
    end
  else
    local scores = redis.call('ZMSCORE', ORDER, unpack(seqs))
    for i, seq in ipairs(seqs) do
      if scores[i] then held[#held + 1] = seq end
    end
  end
  return held
end

-- Removes the listed records (seqs as strings) that the queue holds, a thousand per call;
-- returns how many it removed. `listed_from_order`: the seqs were just read from the order
-- set, so they need no check.
local function remove_records(m, seqs, listed_from_order)
  local removed, seen = 0, {}
  local first = 1
  while first <= #seqs do
    local chunk = {}
    while first <= #seqs and #chunk < 1000 do
      local seq = seqs[first]
      if not seen[seq] then
        seen[seq] = true
        chunk[#chunk + 1] = seq
      end
      first = first + 1
    end
    if #chunk > 0 then
      local held = chunk
      if not listed_from_order then held = held_of(chunk) end
      if #held > 0 then
        local records = redis.call('HMGET', BODIES, unpack(held))
        for i = 1, #held do
          if records[i] then m.bytes = m.bytes - math.max(#records[i] - HEADER, 0) end
        end
        redis.call('ZREM', ORDER, unpack(held))
        redis.call('HDEL', BODIES, unpack(held))
        local with_deadline = redis.call('ZREM', DEADLINES, unpack(held))
        m.dl = math.max(m.dl - with_deadline, 0)
        redis.call('HDEL', DELIVERIES, unpack(held))
        m.live = m.live - #held
        removed = removed + #held
      end
    end
  end
  return removed
end

-- Times a record was handed over: an explicit count, else one if the watermark covers it.
-- Marking a whole batch in order only moves the watermark, so the common path writes no
-- count at all (and a hash of a hundred fields, kept as a listpack, costs O(n) per field).
local function delivery_count(m, seq, explicit)
  if explicit then return tonumber(explicit) end
  if tonumber(seq) <= m.dw then return 1 end
  return 0
end

local function earliest_deadline()
  local e = redis.call('ZRANGE', DEADLINES, 0, 0, 'WITHSCORES')
  if #e == 0 then return -1 end
  return tonumber(e[2])
end

-- Activity keeps a queue alive; one left alone for `ttl` ms vanishes by itself.
local function expire(ttl, ...)
  if ttl > 0 then
    for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ttl) end
  end
end

-- Refreshes every key's TTL when a 64th of it has passed since the last refresh, or when a
-- key was just created (`force`), so all of a queue's keys expire together and a busy queue
-- pays for it rarely.
local function refresh_ttls(m, ttl, now, force)
  if ttl > 0 and (force or now - m.ttl_at >= ttl / 64) then
    m.ttl_at = now
    expire(ttl, META, ORDER, BODIES, DEADLINES, DELIVERIES, DEDUP, DEDUP_AT)
  end
end

-- Counts one more delivery for each of `held` (distinct seqs the queue holds, as canonical
-- strings) whose explicit counts are `counts` (the deliveries hash's replies). When those above
-- the watermark, with `covered` more records the caller passes over (expired or damaged, and
-- about to be removed), are every record the queue holds up to the highest of them, the
-- watermark moves there and they need no count of their own. Returns true when `m` changed.
local function count_deliveries(m, held, counts, covered, ttl)
  local high, above = m.dw, 0
  for _, seq in ipairs(held) do
    local n = tonumber(seq)
    if n > m.dw then
      above = above + 1
      if n > high then high = n end
    end
  end
  local advance = above > 0
    and redis.call('ZCOUNT', ORDER, '(' .. s(m.dw), s(high)) == above + covered
  local updates = {}
  for i, seq in ipairs(held) do
    -- Under the new watermark and never counted before: the watermark says one.
    if not (advance and tonumber(seq) > m.dw and not counts[i]) then
      updates[#updates + 1] = seq
      updates[#updates + 1] = delivery_count(m, seq, counts[i]) + 1
    end
  end
  if #updates > 0 then
    call_chunked('HSET', DELIVERIES, updates)
    expire(ttl, DELIVERIES)
  end
  if advance then m.dw = high end
  return advance
end

-- How far the idle index may lag a queue's activity (purging re-checks the queue itself).
local FILE_EVERY = 60000
