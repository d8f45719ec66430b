-- ARGV: node, ttl ms, live (1/0). Marks this node as holding (or no longer holding) a session
-- for the recipient, until the server's clock passes now + ttl unless refreshed.
if ARGV[3] == '1' then
  local now = server_time_ms()
  -- Marks of nodes that died without clearing them go first.
  local marks = redis.call('HGETALL', PRESENCE)
  for i = 1, #marks, 2 do
    if tonumber(marks[i + 1]) <= now then redis.call('HDEL', PRESENCE, marks[i]) end
  end
  redis.call('HSET', PRESENCE, ARGV[1], s(now + tonumber(ARGV[2])))
  redis.call('PEXPIRE', PRESENCE, tonumber(ARGV[2]) * 2)
else
  redis.call('HDEL', PRESENCE, ARGV[1])
end
return 0
