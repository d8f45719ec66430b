-- Returns {live, bytes, unconfirmed losses, oldest record or false, newest seq or -1}.
local m = load_meta()
if not m then return {0, 0, 0, false, -1} end
local oldest, newest = false, -1
local first = redis.call('ZRANGE', ORDER, 0, 0)
if #first > 0 then oldest = redis.call('HGET', BODIES, first[1]) or false end
local last = redis.call('ZRANGE', ORDER, -1, -1)
if #last > 0 then newest = tonumber(last[1]) end
return {m.live, m.bytes, m.lt - m.lc, oldest, newest}
