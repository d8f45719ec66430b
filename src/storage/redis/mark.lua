-- ARGV: idle ttl ms, then seqs handed to a transport. Counts one more delivery for each the
-- queue holds.
--
-- When the seqs above the delivered watermark cover every record the queue holds up to the
-- highest of them (a batch handed over in order, the usual case), the watermark moves up to it
-- and those records need no count of their own. Otherwise they get explicit counts.
local ttl = tonumber(ARGV[1])
local seqs, seen = {}, {}
for i = 2, #ARGV do
  local seq = s(tonumber(ARGV[i]))
  if not seen[seq] then
    seen[seq] = true
    seqs[#seqs + 1] = seq
  end
end
if #seqs == 0 then return 0 end
local m = load_meta()
if not m then return 0 end
local held, counts = {}, {}
for first = 1, #seqs, 1000 do
  local chunk = held_of({unpack(seqs, first, math.min(first + 999, #seqs))})
  if #chunk > 0 then
    local explicit = redis.call('HMGET', DELIVERIES, unpack(chunk))
    for i, seq in ipairs(chunk) do
      held[#held + 1] = seq
      counts[#counts + 1] = explicit[i]
    end
  end
end
local high, above = m.dw, 0
for _, seq in ipairs(held) do
  local n = tonumber(seq)
  if n > m.dw then
    above = above + 1
    if n > high then high = n end
  end
end
local advance = above > 0 and redis.call('ZCOUNT', ORDER, '(' .. s(m.dw), s(high)) == above
local updates = {}
for i, seq in ipairs(held) do
  local covered_now = advance and tonumber(seq) > m.dw
  -- Under the new watermark and never counted before: the watermark says one.
  if not (covered_now and not counts[i]) then
    updates[#updates + 1] = seq
    updates[#updates + 1] = delivery_count(m, seq, counts[i]) + 1
  end
end
if #updates > 0 then
  call_chunked('HSET', DELIVERIES, updates)
  expire(ttl, DELIVERIES)
end
if advance then
  m.dw = high
  save_meta(m)
end
return 0
