-- KEYS[1]: a deadline or idle index bucket. ARGV: queue name, score purge found, new score
-- (-1 = remove). Changes the entry only if it still holds the score purge found: an append
-- that filed the queue meanwhile keeps its entry.
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current and tonumber(current) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[3]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
