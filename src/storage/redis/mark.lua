-- ARGV: seqs handed to a transport. Counts one more delivery for each the queue holds (see
-- `count_deliveries`).
local seqs, seen = {}, {}
for i = 1, #ARGV do
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
  local chunk = {}
  for _, pair in ipairs(held_of(m, {unpack(seqs, first, math.min(first + 999, #seqs))})) do
    chunk[#chunk + 1] = pair[1]
  end
  local explicit = explicit_counts(m, chunk)
  for i, seq in ipairs(chunk) do
    held[#held + 1] = seq
    counts[#held] = explicit[i]
  end
end
if count_deliveries(m, held, counts, nil, 0, {}) then save_meta(m) end
return 0
