-- ARGV: seqs handed to a transport. Counts one more delivery for each the queue holds.
local err = wrong_type()
if err then return err end
for _, seq in ipairs(ARGV) do
  if redis.call('ZSCORE', ORDER, seq) then redis.call('HINCRBY', DELIVERIES, seq, 1) end
end
return 0
