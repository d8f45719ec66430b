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
local low = '-inf'
if after >= 0 then low = '(' .. s(after) end
local page = math.max(16, math.min(128, max_m))
local done = false
while not done do
  local chunk = redis.call('ZRANGEBYSCORE', ORDER, low, '+inf', 'LIMIT', 0, page)
  if #chunk == 0 then break end
  local deadlines = redis.call('ZMSCORE', DEADLINES, unpack(chunk))
  local records = redis.call('HMGET', BODIES, unpack(chunk))
  local deliveries = redis.call('HMGET', DELIVERIES, unpack(chunk))
  for i, seq in ipairs(chunk) do
    low = '(' .. seq
    local deadline, record = deadlines[i], records[i]
    if deadline and tonumber(deadline) <= now then
      expired[#expired + 1] = tonumber(seq)
      if #expired >= max_m then done = true break end
    elseif not record or #record < HEADER then
      damaged[#damaged + 1] = tonumber(seq)
    else
      local len = #record - HEADER
      if count >= max_m or (count > 0 and bytes + len > max_b) then done = true break end
      count = count + 1
      bytes = bytes + len
      out_records[#out_records + 1] = tonumber(seq)
      out_records[#out_records + 1] = record
      out_records[#out_records + 1] = delivery_count(m, seq, deliveries[i])
      returned[#returned + 1] = seq
      returned_counts[#returned] = deliveries[i]
      out_records[#out_records + 1] = deadline and tonumber(deadline) or 0
    end
  end
  -- A full batch ends here: fetching the next page would read a page of bodies for nothing.
  if count >= max_m or #expired >= max_m or #chunk < page then done = true end
end
if mark and #returned > 0 then
  -- Passed-over records below the last one returned do not hold the watermark back.
  local last = tonumber(returned[#returned])
  local covered = 0
  for _, seq in ipairs(expired) do if seq > m.dw and seq < last then covered = covered + 1 end end
  for _, seq in ipairs(damaged) do if seq > m.dw and seq < last then covered = covered + 1 end end
  if count_deliveries(m, returned, returned_counts, covered, ttl) then save_meta(m) end
end
local out = {m.lt, m.lc, #expired}
for _, seq in ipairs(expired) do out[#out + 1] = seq end
out[#out + 1] = #damaged
for _, seq in ipairs(damaged) do out[#out + 1] = seq end
out[#out + 1] = count
for _, v in ipairs(out_records) do out[#out + 1] = v end
return out
