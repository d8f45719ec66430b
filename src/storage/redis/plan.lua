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
-- The k-th record of the run (nil if it is not a record), and the body bytes of the run
-- through it, told by its `cum` and the front's.
local function at(k)
  if k == 1 then return front end
  local record = redis.call('LINDEX', LOG, guess + k - 1)
  if not record or #record < HEADER then return nil end
  return record
end
local function bytes_through(record)
  return cum_of(record) + #record - HEADER - cum_of(front)
end
local last = at(n)
if not last then return {'miss', m.head} end
if n > 1 and bytes_through(last) > max_b then
  -- The longest prefix within the byte bound (the first record goes even if it alone is
  -- larger): a binary search, a record read per step.
  local low, high = 1, n
  last = front
  while high - low > 1 do
    local mid = math.floor((low + high) / 2)
    local record = at(mid)
    if not record then return {'miss', m.head} end
    if bytes_through(record) <= max_b then
      low, last = mid, record
    else
      high = mid
    end
  end
  n = low
end
local dw_before = m.dw
if mark then
  -- First deliveries of a run that starts at the watermark or the front (nothing held
  -- between them): the watermark moves, and that is all. Anything else is read as usual.
  -- (A damaged record inside the run, which only its ends were checked for, is covered too:
  -- it is never returned, so its count is never seen, and the engine removes it.)
  if not (after <= math.max(m.dw, m.head - 1) and first > m.dw) then return {'miss', m.head} end
  m.dw = first + n - 1
  save_meta(m)
end
return {'run', m.lt, m.lc, dw_before, first, n, cum_of(front), cum_of(last), m.head}
