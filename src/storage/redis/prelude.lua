-- The top of the function library (see `library.rs`): shared by every per-recipient step,
-- each of which starts with `bind(keys)`. All of one recipient's keys share a hash tag, so
-- a step touches one cluster slot. (Loading a library runs this chunk without the `string`
-- table: what it computes here is written out.)
--
-- KEYS[1] meta       string  packed doubles (see FIELDS)
-- KEYS[2] log        list    the records in seq order: element i holds seq head + i, as
--                            8-byte cum (body bytes appended before it, a double), 8-byte
--                            sent_at, 16-byte id, 8-byte deadline (a double, 0 = never),
--                            body; an empty string is a removed record (a tombstone)
-- KEYS[3] exceptions zset    member = seq, score = deadline, for records whose deadline comes
--                            before that of a record appended earlier (see `dmax`)
-- KEYS[4] deliveries hash    seq -> times handed to a transport, for records whose count the
--                            meta's delivered watermark does not imply (see `delivery_count`)
-- KEYS[5] dedup      hash    sender-chosen id -> seq
-- KEYS[6] dedup_at   zset    member = id, score = when stored (ms), to forget ids
-- KEYS[7] presence   hash    node id -> presence deadline (server time, ms)
--
-- Invariants: the log holds seqs head ..= seq, so LLEN = seq - head + 1; its first element
-- is never a tombstone; a queue with nothing live has an empty log.
local KEYS
local META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT, PRESENCE

-- Points the names above at the recipient's keys, for the step about to run (Redis runs
-- one at a time).
local function bind(keys)
  KEYS = keys
  META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT, PRESENCE =
    keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7]
end
local HEADER = 40
local TYPES = {'string', 'list', 'zset', 'hash', 'hash', 'zset', 'hash'}
-- A deadline later than any: what a record that never expires counts as.
local NEVER = 2 ^ 53

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

-- A record's deadline in ms (0: never), from its header.
local function deadline_of(record)
  return (struct.unpack('>d', record, 33))
end

-- Body bytes appended to the queue before this record, from its header.
local function cum_of(record)
  return (struct.unpack('>d', record, 1))
end

-- Meta fields: seq (last assigned), live, bytes, lt (loss total), lc (loss confirmed), touch
-- (last append or ack, ms); filed (touch as last filed in the idle index) and xi (the
-- deadline last filed in the deadline index, -1 for none) spare an index write on most
-- calls; ex (entries in the exceptions set), ud (dedup ids held) and ec (explicit delivery
-- counts) tell when those keys need a command; ttl_at is when the keys' TTLs were last
-- refreshed; dw is the delivered watermark: every record at or below it was handed over at
-- least once; head is the seq of the log's first element; dmax is the latest deadline
-- appended (NEVER after a record that never expires, -1 before any): a record due before
-- it is an exception; cum counts body bytes ever appended, and tb the tombstones in the log
-- (while there are none, the bytes of a run of records are told by the two at its ends); it
-- is the idle TTL in ms the last append set (the engine's idle timeout; 0: keep the queue;
-- -1: not known, in metadata written before the field existed), which acks refresh by.
local FIELDS = {'seq', 'live', 'bytes', 'lt', 'lc', 'touch', 'filed', 'xi', 'ex', 'ud',
                'ttl_at', 'dw', 'head', 'dmax', 'ec', 'cum', 'tb', 'it'}

-- Meta is one string of packed big-endian doubles (exact for integers below 2^53): one GET
-- and one SET, with no number parsing or formatting, which in Lua cost more than the calls.
local PACKING = '>dddddddddddddddddd' -- one 'd' per field
-- The metadata as written before `it` was added: read as `it` unknown, written back whole.
local PACKING_WITHOUT_IT = '>ddddddddddddddddd'

local function load_meta()
  local v = redis.call('GET', META)
  if not v then return nil end
  local it = -1
  local seq, live, bytes, lt, lc, touch, filed, xi, ex, ud, ttl_at, dw, head, dmax, ec, cum, tb
  -- One unpack, not a loop over FIELDS: a table grown field by field rehashes four times,
  -- which made loading the metadata cost more than the GET.
  if #v == 8 * #FIELDS then
    seq, live, bytes, lt, lc, touch, filed, xi, ex, ud, ttl_at, dw, head, dmax, ec, cum, tb, it =
      struct.unpack(PACKING, v)
  elseif #v == 8 * (#FIELDS - 1) then
    seq, live, bytes, lt, lc, touch, filed, xi, ex, ud, ttl_at, dw, head, dmax, ec, cum, tb =
      struct.unpack(PACKING_WITHOUT_IT, v)
  else
    -- Another build's layout (or someone else's data): refuse rather than misread it.
    error(redis.error_reply('OQLAYOUT ' .. META .. ' holds ' .. #v .. ' bytes, not the ' ..
      8 * #FIELDS .. ' of this layout: written by another version of offline-queue?'))
  end
  return {seq = seq, live = live, bytes = bytes, lt = lt, lc = lc, touch = touch, filed = filed,
          xi = xi, ex = ex, ud = ud, ttl_at = ttl_at, dw = dw, head = head, dmax = dmax, ec = ec,
          cum = cum, tb = tb, it = it}
end

local function save_meta(m)
  redis.call('SET', META, struct.pack(PACKING, m.seq, m.live, m.bytes, m.lt, m.lc, m.touch,
    m.filed, m.xi, m.ex, m.ud, m.ttl_at, m.dw, m.head, m.dmax, m.ec, m.cum, m.tb, m.it),
    'KEEPTTL')
end

-- Drops tombstones from the log's front, so its first element is a record; a queue left
-- with nothing live loses its log, exceptions and counts (seqs are never reused, so none of
-- them could matter again).
local function trim_front(m)
  if m.live <= 0 then
    redis.call('DEL', LOG, EXCEPTIONS, DELIVERIES)
    m.head, m.ex, m.ec, m.dmax, m.tb = m.seq + 1, 0, 0, -1, 0
    return
  end
  while m.tb > 0 do
    local front = redis.call('LRANGE', LOG, 0, 31)
    local n = 0
    while n < #front and front[n + 1] == '' do n = n + 1 end
    if n > 0 then
      redis.call('LTRIM', LOG, n, -1)
      m.head = m.head + n
      m.tb = m.tb - n
    end
    if n < 32 then return end
  end
end

-- Which of the listed seqs (canonical strings, at most a thousand) the queue holds, with
-- their records: {seq, record} pairs in list order. Seqs close together are read with one
-- range; scattered ones one by one.
local function held_of(m, seqs)
  local held = {}
  if #seqs == 0 then return held end
  local low, high = math.huge, -math.huge
  for _, seq in ipairs(seqs) do
    local n = tonumber(seq)
    if n < low then low = n end
    if n > high then high = n end
  end
  low, high = math.max(low, m.head), math.min(high, m.seq)
  if low > high then return held end
  if high - low < 2 * #seqs + 16 then
    local span = redis.call('LRANGE', LOG, low - m.head, high - m.head)
    for _, seq in ipairs(seqs) do
      local record = span[tonumber(seq) - low + 1]
      if record and record ~= '' then held[#held + 1] = {seq, record} end
    end
  else
    for _, seq in ipairs(seqs) do
      local n = tonumber(seq)
      if n >= m.head and n <= m.seq then
        local record = redis.call('LINDEX', LOG, n - m.head)
        if record and record ~= '' then held[#held + 1] = {seq, record} end
      end
    end
  end
  return held
end

-- Forgets the explicit delivery counts of removed seqs.
local function forget_counts(m, seqs)
  if m.ec > 0 and #seqs > 0 then
    m.ec = math.max(m.ec - call_chunked('HDEL', DELIVERIES, seqs), 0)
  end
end

-- Forgets removed seqs listed as exceptions, so the set holds what the queue holds.
local function forget_exceptions(m, seqs)
  if m.ex > 0 and #seqs > 0 then
    m.ex = math.max(m.ex - call_chunked('ZREM', EXCEPTIONS, seqs), 0)
  end
end

-- Removes the listed records (seqs as strings) that the queue holds, a thousand per call;
-- returns how many it removed. A record at the front goes with the front; one in the middle
-- leaves a tombstone until the front reaches it.
local function remove_records(m, seqs)
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
    local gone = {}
    for _, pair in ipairs(held_of(m, chunk)) do
      local seq, record = pair[1], pair[2]
      redis.call('LSET', LOG, tonumber(seq) - m.head, '')
      m.tb = m.tb + 1
      m.bytes = m.bytes - math.max(#record - HEADER, 0)
      m.live = m.live - 1
      gone[#gone + 1] = seq
    end
    forget_counts(m, gone)
    forget_exceptions(m, gone)
    removed = removed + #gone
  end
  if removed > 0 then trim_front(m) end
  return removed
end

-- Removes the records from the front through seq `through`; returns how many records (not
-- tombstones) it removed. Without tombstones or explicit counts, the two records at the ends
-- of the run tell its bytes (by their `cum`), and nothing else is read; otherwise a thousand
-- records a step are read to count them.
local function remove_through(m, through)
  local removed = 0
  through = math.min(through, m.seq)
  if m.head > through then return 0 end
  if m.tb <= 0 and m.ec <= 0 and m.ex <= 0 then
    local n = through - m.head + 1
    local first, last = redis.call('LINDEX', LOG, 0), redis.call('LINDEX', LOG, n - 1)
    if first and last and #first >= HEADER and #last >= HEADER then
      m.bytes = m.bytes - (cum_of(last) + #last - HEADER - cum_of(first))
      m.live = m.live - n
      redis.call('LTRIM', LOG, n, -1)
      m.head = m.head + n
      trim_front(m)
      return n
    end
  end
  while m.head <= through do
    local n = math.min(through - m.head + 1, 1000)
    local front = redis.call('LRANGE', LOG, 0, n - 1)
    local gone, listed = {}, m.ec > 0 or m.ex > 0
    for i, record in ipairs(front) do
      if record == '' then
        m.tb = m.tb - 1
      else
        m.bytes = m.bytes - math.max(#record - HEADER, 0)
        m.live = m.live - 1
        removed = removed + 1
        if listed then gone[#gone + 1] = s(m.head + i - 1) end
      end
    end
    redis.call('LTRIM', LOG, n, -1)
    m.head = m.head + n
    forget_counts(m, gone)
    forget_exceptions(m, gone)
  end
  trim_front(m)
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

-- The explicit delivery counts of the listed seqs (nil where none).
local function explicit_counts(m, seqs)
  if m.ec <= 0 or #seqs == 0 then return {} end
  return redis.call('HMGET', DELIVERIES, unpack(seqs))
end

-- The earliest deadline the queue holds (-1 = none): the front record's, or an exception's.
-- Records after the front that are not exceptions are due no earlier than it.
local function earliest_deadline(m)
  local earliest = -1
  if m.live > 0 then
    local front = redis.call('LINDEX', LOG, 0)
    if front and #front >= HEADER then
      local d = deadline_of(front)
      if d > 0 then earliest = d end
    end
  end
  if m.ex > 0 then
    local e = redis.call('ZRANGE', EXCEPTIONS, 0, 0, 'WITHSCORES')
    if #e > 0 and (earliest < 0 or tonumber(e[2]) < earliest) then earliest = tonumber(e[2]) end
  end
  return earliest
end

-- Activity keeps a queue alive; one left alone for `ttl` ms vanishes by itself.
local function expire(ttl, ...)
  if ttl > 0 then
    for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ttl) end
  end
end

-- Gives a key created outside an append or an ack the metadata's remaining TTL, so it goes
-- with the rest of the queue (a read or a mark is not activity and knows no TTL of its own).
local function expire_with_meta(key)
  local left = redis.call('PTTL', META)
  if left > 0 then redis.call('PEXPIRE', key, left) end
end

-- Refreshes every key's TTL to the queue's idle TTL (`m.it`) when a 64th of it has passed
-- since the last refresh, or when a key was just created (`force`), so all of a queue's keys
-- expire together and a busy queue pays for it rarely. A queue to keep (`m.it` 0) loses the
-- TTLs an earlier setting gave its keys; one whose TTL is not known yet keeps them as they
-- are.
local function refresh_ttls(m, now, force)
  local ttl = m.it
  if ttl > 0 and (force or now - m.ttl_at >= ttl / 64) then
    m.ttl_at = now
    expire(ttl, META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT)
  elseif ttl == 0 and m.ttl_at >= 0 then
    m.ttl_at = -1
    for _, key in ipairs({META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT}) do
      redis.call('PERSIST', key)
    end
  end
end

-- Counts one more delivery for each of `held` (distinct seqs the queue holds, as canonical
-- strings) whose explicit counts are `counts`. When those above the watermark are, with
-- records the caller passes over (expired or damaged, about to be removed), every record
-- the queue holds up to the highest of them (`contiguous`: the caller saw every record
-- from the watermark on; nil: find out), the watermark moves there and they need no count
-- of their own; the passed-over ones without a count (`uncounted`, canonical strings) then
-- get an explicit zero, so the watermark does not count them as handed over. Returns true
-- when `m` changed.
local function count_deliveries(m, held, counts, contiguous, covered, uncounted)
  local high, above = m.dw, 0
  for _, seq in ipairs(held) do
    local n = tonumber(seq)
    if n > m.dw then
      above = above + 1
      if n > high then high = n end
    end
  end
  local advance = above > 0 and contiguous
  if above > 0 and contiguous == nil then
    -- Count what the queue holds in (dw, high].
    local present, from = 0, math.max(m.dw + 1, m.head)
    while from <= high do
      local to = math.min(high, from + 999)
      for _, record in ipairs(redis.call('LRANGE', LOG, from - m.head, to - m.head)) do
        if record ~= '' then present = present + 1 end
      end
      from = to + 1
    end
    advance = present == above + covered
  end
  local updates = {}
  for i, seq in ipairs(held) do
    -- Under the new watermark and never counted before: the watermark says one.
    if not (advance and tonumber(seq) > m.dw and not counts[i]) then
      updates[#updates + 1] = seq
      updates[#updates + 1] = delivery_count(m, seq, counts[i]) + 1
    end
  end
  if advance then
    for _, seq in ipairs(uncounted) do
      updates[#updates + 1] = seq
      updates[#updates + 1] = 0
    end
  end
  local changed = false
  if #updates > 0 then
    local created = m.ec <= 0
    m.ec = math.max(m.ec, 0) + call_chunked('HSET', DELIVERIES, updates)
    if created then expire_with_meta(DELIVERIES) end
    changed = true
  end
  if advance then
    m.dw = high
    changed = true
  end
  return changed
end

-- How far the idle index may lag a queue's activity (purging re-checks the queue itself).
local FILE_EVERY = 60000
