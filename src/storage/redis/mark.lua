-- ARGV: idle ttl ms, then seqs handed to a transport. Counts one more delivery for each the
-- queue holds.
local ttl = tonumber(ARGV[1])
local seqs = {}
for i = 2, #ARGV do seqs[#seqs + 1] = ARGV[i] end
if #seqs == 0 then return 0 end
local present = redis.call('ZMSCORE', ORDER, unpack(seqs))
for i, seq in ipairs(seqs) do
  if present[i] then redis.call('HINCRBY', DELIVERIES, seq, 1) end
end
expire(ttl, DELIVERIES)
return 0
