-- ARGV: idle ttl ms, then seqs handed to a transport. Counts one more delivery for each the
-- queue holds.
local ttl = tonumber(ARGV[1])
local seqs = {}
for i = 2, #ARGV do seqs[#seqs + 1] = ARGV[i] end
if #seqs == 0 then return 0 end
local present = redis.call('ZMSCORE', ORDER, unpack(seqs))
local counts = redis.call('HMGET', DELIVERIES, unpack(seqs))
local updates = {}
for i, seq in ipairs(seqs) do
  if present[i] then
    updates[#updates + 1] = seq
    updates[#updates + 1] = tonumber(counts[i] or '0') + 1
  end
end
if #updates > 0 then
  redis.call('HSET', DELIVERIES, unpack(updates))
  expire(ttl, DELIVERIES)
end
return 0
