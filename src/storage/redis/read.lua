-- ARGV: after (-1 = from the start), max messages, max bytes, now, mark (1: count a delivery
-- for each record returned, as mark.lua does; the reply tells the counts from before).
-- Returns {loss total, loss confirmed, {expired seqs}, {damaged seqs}, watermark before,
--          first seq, {records}, {their seqs}, {their explicit counts}, head, plain}:
-- the seqs are listed only when the records are not a run from the first seq, the counts
-- only when the queue keeps any (else false each); head is the seq at the log's front
-- afterwards (-1: no queue); plain is 1 when the queue is a plain run (no tombstones,
-- exceptions or explicit counts), as `plan.lua` needs.
local m = load_meta()
if not m then return {0, 0, {}, {}, 0, 0, {}, {}, {}, -1, 0} end
local after, max_m, max_b, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mark = ARGV[5] == '1'
local dw_before = m.dw
local first = math.max(after + 1, m.head)
local expired, damaged, records, seqs, counts = {}, {}, {}, {}, {}
-- Passed-over seqs that carry an explicit delivery count (the rest have none of their own).
local counted = {}
-- One record more than a batch: a read that fills its batch sees the record after it, and
-- stops there unless it is expired (then, as every backend does, it goes on passing over
-- expired records, up to a batch of them, until an unexpired one).
local page = math.max(16, math.min(128, max_m) + 1)

-- The common case, a run: no tombstones, no exceptions (so deadlines rise with seqs), no
-- explicit delivery counts, and the first record not due, so none after it is. The page goes back as it came, cut to the
-- batch's bounds.
local run = false
if m.live > 0 and first <= m.seq and m.tb <= 0 and m.ex <= 0 and m.ec <= 0 then
  local chunk = redis.call('LRANGE', LOG, first - m.head, first - m.head + page - 1)
  local front = chunk[1]
  if front and #front >= HEADER then
    local deadline = deadline_of(front)
    if deadline <= 0 or deadline > now then
      run = true
      local count, bytes = 0, 0
      for _, record in ipairs(chunk) do
        local len = #record - HEADER
        if len < 0 then
          run = false
          break
        end
        if count >= max_m or (count > 0 and bytes + len > max_b) then break end
        count = count + 1
        bytes = bytes + len
      end
      if run then
        for i = #chunk, count + 1, -1 do chunk[i] = nil end
        -- A batch cut short by the page (not by its bounds) may go on: read on as below.
        if count == #chunk and #chunk == page and count < max_m then
          run = false
        else
          records = chunk
        end
      end
    end
  end
end

local returned = 0
if not run then
  local count, bytes = 0, 0
  local next_seq = first
  local done = m.live <= 0
  while not done and next_seq <= m.seq do
    local start = next_seq - m.head
    local chunk = redis.call('LRANGE', LOG, start, start + page - 1)
    if #chunk == 0 then break end
    local page_seqs = {}
    if m.ec > 0 then
      for i = 1, #chunk do page_seqs[i] = s(next_seq + i - 1) end
    end
    local explicit = explicit_counts(m, page_seqs)
    for i, record in ipairs(chunk) do
      local seq = next_seq + i - 1
      if record == '' then
        -- removed
      elseif #record < HEADER then
        damaged[#damaged + 1] = seq
        if explicit[i] then counted[seq] = true end
      else
        local deadline = deadline_of(record)
        if deadline > 0 and deadline <= now then
          expired[#expired + 1] = seq
          if explicit[i] then counted[seq] = true end
          if #expired >= max_m then done = true break end
        else
          local len = #record - HEADER
          if count >= max_m or (count > 0 and bytes + len > max_b) then done = true break end
          count = count + 1
          bytes = bytes + len
          records[count] = record
          seqs[count] = seq
          counts[count] = explicit[i] or false
        end
      end
    end
    next_seq = next_seq + #chunk
    if #chunk < page then done = true end
  end
  returned = count
else
  returned = #records
end

if mark and returned > 0 then
  local last = first + returned - 1
  if not run then last = seqs[returned] end
  -- Passed-over records below the last one returned do not hold the watermark back, and
  -- a read that started at or below the watermark (or the front: nothing is held between
  -- the two) saw every record up to the last.
  local contiguous = nil
  if after <= math.max(m.dw, m.head - 1) then contiguous = true end
  if run and contiguous and m.ec <= 0 and first > m.dw then
    -- First deliveries of a run, from the watermark on: it moves, and that is all.
    m.dw = last
    save_meta(m)
  else
    local held = {}
    for i = 1, returned do held[i] = s(run and first + i - 1 or seqs[i]) end
    -- Passed over between the watermark and the last record: the watermark may move over
    -- them, and those without a count of their own then get an explicit zero (they were not
    -- handed over, and a clock stepping back may make an expired one deliverable again).
    local covered, uncounted = 0, {}
    for _, list in ipairs({expired, damaged}) do
      for _, seq in ipairs(list) do
        if seq > m.dw and seq < last then
          covered = covered + 1
          if not counted[seq] then uncounted[#uncounted + 1] = s(seq) end
        end
      end
    end
    if count_deliveries(m, held, counts, contiguous, covered, uncounted) then save_meta(m) end
  end
end
if run then seqs = {} end
if m.ec <= 0 then counts = {} end
local plain = 0
if m.tb <= 0 and m.ex <= 0 and m.ec <= 0 then plain = 1 end
return {m.lt, m.lc, expired, damaged, dw_before, first, records, seqs, counts, m.head, plain}
