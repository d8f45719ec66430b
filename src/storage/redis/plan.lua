-- The first half of a read that brings no record into Lua: the caller runs this and
-- `LRANGE log guess guess + max messages - 1` in one MULTI, and takes the records from the
-- LRANGE when this answers 'run'.
-- ARGV: after (-1 = from the start), max messages, max bytes, now, mark (1/0), guess (the
-- list index the caller expects the first record after `after` at).
-- Returns {'run', loss total, loss confirmed, watermark before, first seq, count, first cum,
-- last cum, head}: the `count` records from the guessed index are the batch, none expired, their
-- deliveries counted if asked; or {'miss', head} with nothing done: the caller reads as usual.
local m = load_meta()
if not m then return {'miss', -1} end
local after, max_m, max_b, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mark, guess = ARGV[5] == '1', tonumber(ARGV[6])
local first = math.max(after + 1, m.head)
-- A run as read.lua takes it: nothing removed in the middle, deadlines in seq order, no
-- explicit counts; and the guess right.
if m.live <= 0 or first > m.seq or m.tb > 0 or m.ex > 0 or m.ec > 0 or first - m.head ~= guess then
  return {'miss', m.head}
end
local n = math.min(max_m, m.seq - first + 1)
local front = redis.call('LINDEX', LOG, guess)
if not front or #front < HEADER then return {'miss', m.head} end
local deadline = deadline_of(front)
if deadline > 0 and deadline <= now then return {'miss', m.head} end
-- The body bytes of the first k records, told by the records at the run's two ends (nil if
-- the k-th is not a record).
local function bytes_of(k)
  local last = front
  if k > 1 then last = redis.call('LINDEX', LOG, guess + k - 1) end
  if not last or #last < HEADER then return nil end
  return cum_of(last) + #last - HEADER - cum_of(front)
end
local last_cum = cum_of(front)
local all = bytes_of(n)
if not all then return {'miss', m.head} end
if n > 1 and all > max_b then
  -- The longest prefix within the byte bound (the first record goes even if it alone is
  -- larger): a binary search, a record read per step.
  local low, high = 1, n
  while high - low > 1 do
    local mid = math.floor((low + high) / 2)
    local b = bytes_of(mid)
    if not b then return {'miss', m.head} end
    if b <= max_b then low = mid else high = mid end
  end
  n = low
end
if n > 1 then
  local last = redis.call('LINDEX', LOG, guess + n - 1)
  if not last or #last < HEADER then return {'miss', m.head} end
  last_cum = cum_of(last)
end
local dw_before = m.dw
if mark then
  -- First deliveries of a run that starts at the watermark or the front (nothing held
  -- between them): the watermark moves, and that is all. Anything else is read as usual.
  if not (after <= math.max(m.dw, m.head - 1) and first > m.dw) then return {'miss', m.head} end
  m.dw = first + n - 1
  save_meta(m)
end
return {'run', m.lt, m.lc, dw_before, first, n, cum_of(front), last_cum, m.head}
