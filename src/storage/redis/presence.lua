-- ARGV: node, ttl ms, live (1/0). Marks this node as holding (or no longer holding) a session
-- for the recipient, until the server's clock passes now + ttl unless refreshed.
local err = wrong_type()
if err then return err end
if ARGV[3] == '1' then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('HSET', PRESENCE, ARGV[1], s(now + tonumber(ARGV[2])))
  redis.call('PEXPIRE', PRESENCE, tonumber(ARGV[2]) * 2)
else
  redis.call('HDEL', PRESENCE, ARGV[1])
end
return 0
