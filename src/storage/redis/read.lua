-- ARGV: after (-1 = from the start), max messages, max bytes, now.
-- Returns {loss total, loss confirmed, expired count, expired seqs...,
--          damaged count, damaged seqs..., record count, (seq, record, deliveries, deadline)...}.
local m = load_meta()
if not m then return {0, 0, 0, 0, 0} end
local after, max_m, max_b, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local expired, damaged, records = {}, {}, {}
local count, bytes = 0, 0
local low = '-inf'
if after >= 0 then low = '(' .. s(after) end
local done = false
while not done do
  local chunk = redis.call('ZRANGEBYSCORE', ORDER, low, '+inf', 'LIMIT', 0, 128)
  if #chunk == 0 then break end
  for _, seq in ipairs(chunk) do
    low = '(' .. seq
    local deadline = redis.call('ZSCORE', DEADLINES, seq)
    local record = redis.call('HGET', BODIES, seq)
    if deadline and tonumber(deadline) <= now then
      table.insert(expired, tonumber(seq))
      if #expired >= max_m then done = true break end
    elseif not record or #record < HEADER then
      table.insert(damaged, tonumber(seq))
    else
      local len = #record - HEADER
      if count >= max_m or (count > 0 and bytes + len > max_b) then done = true break end
      count = count + 1
      bytes = bytes + len
      table.insert(records, tonumber(seq))
      table.insert(records, record)
      table.insert(records, tonumber(redis.call('HGET', DELIVERIES, seq) or '0'))
      table.insert(records, deadline and tonumber(deadline) or 0)
    end
  end
end
local out = {m.lt, m.lc, #expired}
for _, seq in ipairs(expired) do table.insert(out, seq) end
table.insert(out, #damaged)
for _, seq in ipairs(damaged) do table.insert(out, seq) end
table.insert(out, count)
for _, v in ipairs(records) do table.insert(out, v) end
return out
