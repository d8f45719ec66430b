-- ARGV: after (-1 = from the start), max messages, max bytes, now, mark (1: count a delivery
-- for each record returned, as mark.lua does; their counts are returned from before), idle
-- ttl ms.
-- Returns {loss total, loss confirmed, expired count, expired seqs...,
--          damaged count, damaged seqs..., record count, (seq, record, deliveries, deadline)...}.
local m = load_meta()
if not m then return {0, 0, 0, 0, 0} end
local after, max_m, max_b, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mark, ttl = ARGV[5] == '1', tonumber(ARGV[6])
local expired, damaged, out_records = {}, {}, {}
local returned, returned_counts = {}, {}
local count, bytes = 0, 0
local next_seq = math.max(after + 1, m.head)
local page = math.max(16, math.min(128, max_m))
local done = m.live <= 0
while not done and next_seq <= m.seq do
  local start = next_seq - m.head
  local chunk = redis.call('LRANGE', LOG, start, start + page - 1)
  if #chunk == 0 then break end
  local seqs = {}
  if m.ec > 0 then
    for i = 1, #chunk do seqs[i] = s(next_seq + i - 1) end
  end
  local deliveries = explicit_counts(m, seqs)
  for i, record in ipairs(chunk) do
    local seq = next_seq + i - 1
    if record == '' then
      -- removed
    elseif #record < HEADER then
      damaged[#damaged + 1] = seq
    else
      local deadline = deadline_of(record)
      if deadline > 0 and deadline <= now then
        expired[#expired + 1] = seq
        if #expired >= max_m then done = true break end
      else
        local len = #record - HEADER
        if count >= max_m or (count > 0 and bytes + len > max_b) then done = true break end
        count = count + 1
        bytes = bytes + len
        out_records[#out_records + 1] = seq
        out_records[#out_records + 1] = record
        out_records[#out_records + 1] = delivery_count(m, seq, deliveries[i])
        out_records[#out_records + 1] = deadline
        returned[#returned + 1] = s(seq)
        returned_counts[#returned] = deliveries[i]
      end
    end
  end
  next_seq = next_seq + #chunk
  -- A full batch ends here: fetching the next page would read a page of records for nothing.
  if count >= max_m or #chunk < page then done = true end
end
if mark and #returned > 0 then
  -- Passed-over records below the last one returned do not hold the watermark back, and
  -- a read that started at or below the watermark (or the front: nothing is held between
  -- the two) saw every record up to the last.
  local last = tonumber(returned[#returned])
  local covered = 0
  for _, seq in ipairs(expired) do if seq > m.dw and seq < last then covered = covered + 1 end end
  for _, seq in ipairs(damaged) do if seq > m.dw and seq < last then covered = covered + 1 end end
  local contiguous = nil
  if after <= math.max(m.dw, m.head - 1) then contiguous = true end
  if count_deliveries(m, returned, returned_counts, contiguous, covered, ttl) then save_meta(m) end
end
local out = {m.lt, m.lc, #expired}
for _, seq in ipairs(expired) do out[#out + 1] = seq end
out[#out + 1] = #damaged
for _, seq in ipairs(damaged) do out[#out + 1] = seq end
out[#out + 1] = count
for _, v in ipairs(out_records) do out[#out + 1] = v end
return out
