-- ARGV: idle ttl ms, then seqs handed to a transport. Counts one more delivery for each the
-- queue holds.
local ttl = tonumber(ARGV[1])
local seqs = {}
for i = 2, #ARGV do seqs[#seqs + 1] = ARGV[i] end
if #seqs == 0 then return 0 end
local updates = {}
for first = 1, #seqs, 1000 do
  local last = math.min(first + 999, #seqs)
  local present = redis.call('ZMSCORE', ORDER, unpack(seqs, first, last))
  local counts = redis.call('HMGET', DELIVERIES, unpack(seqs, first, last))
  for i = 1, last - first + 1 do
    if present[i] then
      updates[#updates + 1] = seqs[first + i - 1]
      updates[#updates + 1] = tonumber(counts[i] or '0') + 1
    end
  end
end
if #updates > 0 then
  call_chunked('HSET', DELIVERIES, updates)
  expire(ttl, DELIVERIES)
end
return 0
