-- KEYS[1]: the storage-wide byte counter. ARGV: bytes to add, budget.
-- Returns {1, used} after reserving, or {0, used} when the bytes would not fit.
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, used} end
redis.call('INCRBY', KEYS[1], ARGV[1])
return {1, used}
