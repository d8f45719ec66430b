-- ARGV: now, dedup window ms, max messages, max bytes, drop oldest (1/0), idle ttl ms, node,
-- record count, then per record: dedup (1/0), id, deadline ms (0 = never), record bytes.
-- Returns {'full', live, bytes, adding, adding bytes} with nothing written, or
-- {'ok', dropped, live, byte delta, n, (stored 1/0, seq) * n, node count, nodes...}.
local err = wrong_type()
if err then return err end
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_m, max_b = tonumber(ARGV[3]), tonumber(ARGV[4])
local drop_oldest, ttl, node, n = ARGV[5] == '1', tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])

if window > 0 then
  local old = redis.call('ZRANGEBYSCORE', DEDUP_AT, '-inf', s(now - window))
  for _, id in ipairs(old) do redis.call('HDEL', DEDUP, id) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', DEDUP_AT, '-inf', s(now - window)) end
end

-- Plan without writing: which records are new, and what they cost.
local plan, in_batch = {}, {}
local adding, adding_bytes = 0, 0
for i = 1, n do
  local at = 8 + (i - 1) * 4
  local dedup, id, record = ARGV[at + 1] == '1', ARGV[at + 2], ARGV[at + 4]
  if dedup then
    local seq = redis.call('HGET', DEDUP, id)
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
    adding_bytes = adding_bytes + (#record - HEADER)
  end
end

local m = load_meta()
local live, bytes = 0, 0
if m then live, bytes = m.live, m.bytes end
local function fits(keep, keep_bytes)
  return keep + adding <= max_m and keep_bytes + adding_bytes <= max_b
end
local to_drop = {}
if adding > 0 and not fits(live, bytes) then
  if not drop_oldest or adding > max_m or adding_bytes > max_b then
    return {'full', live, bytes, adding, adding_bytes}
  end
  local keep, keep_bytes, offset = live, bytes, 0
  while not fits(keep, keep_bytes) do
    local chunk = redis.call('ZRANGE', ORDER, offset, offset + 99)
    if #chunk == 0 then break end
    for _, seq in ipairs(chunk) do
      if fits(keep, keep_bytes) then break end
      keep = keep - 1
      keep_bytes = keep_bytes - math.max(redis.call('HSTRLEN', BODIES, seq) - HEADER, 0)
      table.insert(to_drop, seq)
    end
    offset = offset + #chunk
  end
end

local out
if adding == 0 then
  out = {'ok', 0, live, 0, n}
  for i = 1, n do
    table.insert(out, 0)
    table.insert(out, plan[i][2])
  end
else
  if not m then
    -- A new queue's seqs and loss total start from the clock, above anything an earlier
    -- queue of this recipient reached (unless it took over 1,000 appends per ms of its life).
    local base = now * 1000
    m = {seq = base, live = 0, bytes = 0, lt = base, lc = base, touch = now}
  end
  local before = m.bytes
  local dropped = 0
  for _, seq in ipairs(to_drop) do
    if remove_record(m, seq) then
      m.lt = m.lt + 1
      dropped = dropped + 1
    end
  end
  local first = m.seq + 1
  for i = 1, n do
    if plan[i][1] == 'new' then
      local at = 8 + (i - 1) * 4
      m.seq = m.seq + 1
      local seq = s(m.seq)
      local record = ARGV[at + 4]
      redis.call('ZADD', ORDER, seq, seq)
      redis.call('HSET', BODIES, seq, record)
      local deadline = tonumber(ARGV[at + 3])
      if deadline > 0 then redis.call('ZADD', DEADLINES, s(deadline), seq) end
      if ARGV[at + 1] == '1' and window > 0 then
        redis.call('HSET', DEDUP, ARGV[at + 2], seq)
        redis.call('ZADD', DEDUP_AT, s(now), ARGV[at + 2])
      end
      m.live = m.live + 1
      m.bytes = m.bytes + (#record - HEADER)
    end
  end
  if now > m.touch then m.touch = now end
  save_meta(m)
  refresh_ttl(ttl)
  out = {'ok', dropped, m.live, m.bytes - before, n}
  for i = 1, n do
    local kind, value = plan[i][1], plan[i][2]
    if kind == 'new' then
      table.insert(out, 1)
      table.insert(out, first + value)
    elseif kind == 'dup_new' then
      table.insert(out, 0)
      table.insert(out, first + value)
    else
      table.insert(out, 0)
      table.insert(out, value)
    end
  end
end

-- Other nodes holding a session for this recipient, by the server's clock.
local time = redis.call('TIME')
local server_now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local present = redis.call('HGETALL', PRESENCE)
local nodes = {}
for i = 1, #present, 2 do
  if present[i] ~= node and tonumber(present[i + 1]) > server_now then
    table.insert(nodes, present[i])
  end
end
table.insert(out, #nodes)
for _, other in ipairs(nodes) do table.insert(out, other) end
return out
