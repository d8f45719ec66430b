-- ARGV: through (-1 = none), now, loss confirmed through (-1 = none), idle ttl ms,
-- seq count, seqs..., passed-over count, passed-over seqs...
-- Returns {records removed by the ack, bytes freed}.
local err = wrong_type()
if err then return err end
local m = load_meta()
if not m then return {0, 0} end
local through, now, confirmed, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local before, removed = m.bytes, 0
if through >= 0 then
  while true do
    local chunk = redis.call('ZRANGEBYSCORE', ORDER, '-inf', s(through), 'LIMIT', 0, 256)
    if #chunk == 0 then break end
    for _, seq in ipairs(chunk) do
      if remove_record(m, seq) then removed = removed + 1 end
    end
  end
end
local n = tonumber(ARGV[5])
for i = 1, n do
  if remove_record(m, ARGV[5 + i]) then removed = removed + 1 end
end
local at = 6 + n
for i = 1, tonumber(ARGV[at]) do
  if remove_record(m, ARGV[at + i]) then m.lt = m.lt + 1 end
end
if confirmed >= 0 then m.lc = math.max(m.lc, math.min(confirmed, m.lt)) end
if now > m.touch then m.touch = now end
save_meta(m)
refresh_ttl(ttl)
return {removed, before - m.bytes}
