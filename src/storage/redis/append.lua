-- ARGV: the numbers, packed as eight big-endian doubles (now, dedup window ms, max messages,
-- max bytes, drop oldest 1/0, idle ttl ms, record count, byte cap: the most body bytes the
-- append may add net of duplicates and drops, -1 for no cap); node; one byte per record, '1'
-- where its id is deduplicated; then each record as stored but for its leading `cum`, which
-- is added here (sent_at, id, deadline, body). Few arguments: Redis turns each into a Lua
-- string, which costs more than reading numbers out of one.
-- Returns {'full', live, bytes, adding, adding bytes} or {'over cap', net bytes} with nothing
-- written, or
-- {'ok', dropped, live, byte delta, file idle (touch or -1), file deadline (ms or -1), n,
--  (stored 1/0, seq) * n, node count, nodes...}.
local ARRIVING = HEADER - 8
local now, window, max_m, max_b, drop, ttl, n, cap = struct.unpack('>dddddddd', ARGV[1])
local drop_oldest, node, dedup_flags = drop == 1, ARGV[2], ARGV[3]
-- Record i's argument, whether its id is deduplicated, its id and its deadline (0: none).
local function arriving(i) return ARGV[3 + i] end
local function deduplicated(i) return string.byte(dedup_flags, i) == 49 end
local function id_of(record) return string.sub(record, 9, 24) end
local function arriving_deadline(record) return (struct.unpack('>d', record, 25)) end

-- Other nodes holding a session for this recipient, by the server's clock: appended to
-- `out` as a count and the nodes.
local function add_nodes(out)
  local count_at = #out + 1
  out[count_at] = 0
  if redis.call('EXISTS', PRESENCE) == 1 then
    local server_now = server_time_ms()
    local present = redis.call('HGETALL', PRESENCE)
    for i = 1, #present, 2 do
      if present[i] ~= node and tonumber(present[i + 1]) > server_now then
        out[#out + 1] = present[i]
      end
    end
  end
  out[count_at] = #out - count_at
  return out
end

-- The common append: one record to a queue that holds some, within its quota if new, with
-- no cap. It does what the general path below does for it, with the metadata in locals and
-- no table but the reply, and one `HSETNX` where the general path checks the id (`HGET`)
-- and then records it (`HSET`). Anything else (a drop or a refusal, a new queue, another
-- layout, TTLs to remove, dedup without a window) returns nil before anything is written,
-- and the general path runs.
local CLEAN_EVERY = 16
local function append_one()
  if n ~= 1 or cap >= 0 then return nil end
  local v = redis.call('GET', META)
  if not v or #v ~= 8 * #FIELDS then return nil end
  local seq, live, bytes, lt, lc, touch, filed, xi, ex, ud, ttl_at, dw, head, dmax, ec, cum, tb =
    struct.unpack(PACKING, v)
  if live <= 0 or (ttl == 0 and ttl_at >= 0) then return nil end
  local record = arriving(1)
  local size = #record - ARRIVING
  -- Whether a new record fits does not depend on the dedup ids: a duplicate of a full queue
  -- goes to the general path, which answers it as a duplicate.
  if live + 1 > max_m or bytes + size > max_b then return nil end
  local flagged = deduplicated(1)
  if flagged and window <= 0 and ud > 0 then return nil end
  -- Written from here on. Expired dedup ids go on every 16th seq (up to a thousand at a
  -- time, as in the general path, which runs it on every call): whether an id is a duplicate
  -- is told by its time (`ZSCORE`), not by whether it was forgotten yet, so the answer is the
  -- same either way, and a queue holds at most 15 appends' worth of expired ids more.
  if window > 0 and ud > 0 and (seq + 1) % CLEAN_EVERY == 0 then
    local old = redis.call('ZRANGEBYSCORE', DEDUP_AT, '-inf', s(now - window), 'LIMIT', 0, 1000)
    if #old > 0 then
      ud = ud - redis.call('HDEL', DEDUP, unpack(old))
      redis.call('ZREM', DEDUP_AT, unpack(old))
    end
  end
  -- A key about to be created needs its TTL now: then every key's TTL is set together.
  local fresh = ttl_at < 0
  seq = seq + 1
  local seq_text = s(seq)
  if flagged and window > 0 then
    local id = id_of(record)
    if ud > 0 then
      if redis.call('HSETNX', DEDUP, id, seq_text) == 1 then
        ud = ud + 1
      else
        -- Held: a duplicate if stored within the window (answered with the metadata as it
        -- was, as the general path does), else stored again under the new seq.
        local held = redis.call('HGET', DEDUP, id)
        local stored_at = tonumber(redis.call('ZSCORE', DEDUP_AT, id))
        if stored_at and now - stored_at < window then
          return add_nodes({'ok', 0, live, 0, -1, -1, 1, 0, tonumber(held)})
        end
        redis.call('HSET', DEDUP, id, seq_text)
      end
    else
      fresh = true
      ud = math.max(ud, 0) + redis.call('HSET', DEDUP, id, seq_text)
    end
    redis.call('ZADD', DEDUP_AT, s(now), id)
  end
  redis.call('RPUSH', LOG, struct.pack('>d', cum) .. record)
  local deadline = arriving_deadline(record)
  if deadline <= 0 then
    dmax = NEVER
  elseif deadline >= dmax then
    dmax = deadline
  else
    if ex <= 0 then fresh = true end
    ex = math.max(ex, 0) + redis.call('ZADD', EXCEPTIONS, s(deadline), seq_text)
  end
  live, bytes, cum = live + 1, bytes + size, cum + size
  if now > touch then touch = now end
  local file_idle, file_deadline = -1, -1
  if touch - filed >= FILE_EVERY then
    filed = touch
    file_idle = touch
  end
  if deadline > 0 and (xi < 0 or deadline < xi) then
    xi = deadline
    file_deadline = deadline
  end
  -- As `refresh_ttls` (a queue to keep with TTLs to remove went to the general path).
  if ttl > 0 and (fresh or now - ttl_at >= ttl / 64) then
    ttl_at = now
    expire(ttl, META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT)
  end
  redis.call('SET', META, struct.pack(PACKING, seq, live, bytes, lt, lc, touch, filed, xi, ex,
    ud, ttl_at, dw, head, dmax, ec, cum, tb, ttl), 'KEEPTTL')
  return add_nodes({'ok', 0, live, size, file_idle, file_deadline, 1, 1, seq})
end

local fast = append_one()
if fast then return fast end

local m = load_meta()
if not m then
  -- Our keys are checked when the queue is created, before anything is written.
  local err = wrong_type()
  if err then return err end
end

if window > 0 and m and m.ud > 0 then
  local old = redis.call('ZRANGEBYSCORE', DEDUP_AT, '-inf', s(now - window), 'LIMIT', 0, 1000)
  if #old > 0 then
    m.ud = m.ud - redis.call('HDEL', DEDUP, unpack(old))
    redis.call('ZREM', DEDUP_AT, unpack(old))
  end
end

-- Plan without writing: which records are new, and what they cost.
local plan, in_batch = {}, {}
local adding, adding_bytes = 0, 0
for i = 1, n do
  local record = arriving(i)
  local dedup = deduplicated(i)
  local id = dedup and id_of(record)
  if dedup then
    local seq = m and m.ud > 0 and redis.call('HGET', DEDUP, id)
    local stored_at = seq and tonumber(redis.call('ZSCORE', DEDUP_AT, id))
    if seq and stored_at and now - stored_at < window then
      plan[i] = {'dup', tonumber(seq)}
    elseif in_batch[id] then
      plan[i] = {'dup_new', in_batch[id]}
    else
      in_batch[id] = adding
    end
  end
  if not plan[i] then
    plan[i] = {'new', adding}
    adding = adding + 1
    adding_bytes = adding_bytes + (#record - ARRIVING)
  end
end

local live, bytes = 0, 0
if m then live, bytes = m.live, m.bytes end
local function fits(keep, keep_bytes)
  return keep + adding <= max_m and keep_bytes + adding_bytes <= max_b
end
local drop_through, drop_bytes = -1, 0
if adding > 0 and not fits(live, bytes) then
  if not drop_oldest or adding > max_m or adding_bytes > max_b then
    return {'full', live, bytes, adding, adding_bytes}
  end
  -- The oldest records go, from the front of the log, through `drop_through`.
  local keep, keep_bytes, offset = live, bytes, 0
  while not fits(keep, keep_bytes) do
    local chunk = redis.call('LRANGE', LOG, offset, offset + 99)
    if #chunk == 0 then break end
    for i, record in ipairs(chunk) do
      if fits(keep, keep_bytes) then break end
      if record ~= '' then
        keep = keep - 1
        keep_bytes = keep_bytes - math.max(#record - HEADER, 0)
        drop_through = m.head + offset + i - 1
      end
    end
    offset = offset + #chunk
  end
  drop_bytes = bytes - keep_bytes
end
-- Under a cap (the storage-wide budget had no room for the whole batch), only what adds no
-- more than the cap goes ahead: duplicates and drops make room without a reservation.
if cap >= 0 and adding_bytes - drop_bytes > cap then
  return {'over cap', adding_bytes - drop_bytes}
end

local out
if adding == 0 then
  out = {'ok', 0, live, 0, -1, -1, n}
  for i = 1, n do
    out[#out + 1] = 0
    out[#out + 1] = plan[i][2]
  end
else
  if not m then
    -- A new queue's seqs and loss total start from the clock, above anything an earlier
    -- queue of this recipient reached (unless it took over 1,000 appends per ms of its life).
    -- The later of the engine's clock and the server's, so nodes with skewed clocks agree.
    local base = math.max(now, server_time_ms()) * 1000
    m = {seq = base, live = 0, bytes = 0, lt = base, lc = base, touch = now, filed = -1, xi = -1,
         ex = 0, ud = 0, ttl_at = -1, dw = 0, head = base + 1, dmax = -1, ec = 0, cum = 0, tb = 0,
         it = ttl}
    -- Leftovers of a queue whose metadata expired first are not this queue's.
    redis.call('DEL', LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT)
  end
  -- A queue that held nothing (no record, no loss to report) is no queue: this append starts
  -- its idle time, even if the clock stepped back since its last step (as on backends that
  -- delete an emptied queue).
  local refilled = m.live <= 0 and m.lt == m.lc
  -- A key about to be created needs its TTL now: then every key's TTL is set together.
  local fresh = m.live <= 0 or m.ttl_at < 0
  local before = m.bytes
  local dropped = 0
  if drop_through >= 0 then dropped = remove_through(m, drop_through) end
  -- Dropping every record deleted the log: the one about to be created needs its TTL.
  if m.live <= 0 then fresh = true end
  m.lt = m.lt + dropped
  local first = m.seq + 1
  local records, exceptions, ids, id_times = {}, {}, {}, {}
  local earliest = -1
  for i = 1, n do
    if plan[i][1] == 'new' then
      m.seq = m.seq + 1
      local seq = s(m.seq)
      local record = arriving(i)
      records[#records + 1] = struct.pack('>d', m.cum) .. record
      local deadline = arriving_deadline(record)
      if deadline <= 0 then
        m.dmax = NEVER
      elseif deadline >= m.dmax then
        -- In deadline order: found by walking the log from its front.
        m.dmax = deadline
      else
        exceptions[#exceptions + 1] = s(deadline)
        exceptions[#exceptions + 1] = seq
      end
      if deadline > 0 and (earliest < 0 or deadline < earliest) then earliest = deadline end
      if window > 0 and deduplicated(i) then
        local id = id_of(record)
        ids[#ids + 1] = id
        ids[#ids + 1] = seq
        id_times[#id_times + 1] = s(now)
        id_times[#id_times + 1] = id
      end
      m.live = m.live + 1
      m.bytes = m.bytes + (#record - ARRIVING)
      m.cum = m.cum + (#record - ARRIVING)
    end
  end
  call_chunked('RPUSH', LOG, records)
  if #exceptions > 0 then
    if m.ex <= 0 then fresh = true end
    m.ex = math.max(m.ex, 0) + call_chunked('ZADD', EXCEPTIONS, exceptions)
  end
  if #ids > 0 then
    if m.ud <= 0 then fresh = true end
    m.ud = math.max(m.ud, 0) + call_chunked('HSET', DEDUP, ids)
    call_chunked('ZADD', DEDUP_AT, id_times)
  end
  -- Index entries to write beside this script: only when they would change.
  local file_idle, file_deadline = -1, -1
  if refilled and now < m.touch then
    m.touch = now
    -- Filed again under the earlier time if it was filed later, or not at all (an entry
    -- that failed is forgotten, -1): filed <= touch holds, so purge finds the queue by then.
    if m.filed < 0 or now < m.filed then
      m.filed, file_idle = now, now
    end
  else
    if now > m.touch then m.touch = now end
    if m.touch - m.filed >= FILE_EVERY then
      m.filed = m.touch
      file_idle = m.touch
    end
  end
  if earliest >= 0 and (m.xi < 0 or earliest < m.xi) then
    m.xi = earliest
    file_deadline = earliest
  end
  m.it = ttl
  refresh_ttls(m, now, fresh)
  save_meta(m)
  if fresh then expire(ttl, META) end
  out = {'ok', dropped, m.live, m.bytes - before, file_idle, file_deadline, n}
  for i = 1, n do
    local kind, value = plan[i][1], plan[i][2]
    if kind == 'new' then
      out[#out + 1] = 1
      out[#out + 1] = first + value
    elseif kind == 'dup_new' then
      out[#out + 1] = 0
      out[#out + 1] = first + value
    else
      out[#out + 1] = 0
      out[#out + 1] = value
    end
  end
end

return add_nodes(out)
