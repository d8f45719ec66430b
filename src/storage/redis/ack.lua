-- ARGV: through (-1 = none), now, loss confirmed through (-1 = none), seq count, seqs...,
-- passed-over count, passed-over seqs... The keys' TTLs are refreshed by the idle TTL the
-- last append stored in the metadata.
-- Returns {records removed by the ack, bytes freed, file idle (touch or -1), head (the seq
-- at the log's front afterwards, -1: no queue)}.
local m = load_meta()
if not m then return {0, 0, -1, -1} end
local through, now, confirmed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local before, removed = m.bytes, 0
if through >= 0 then removed = remove_through(m, through) end
local n = tonumber(ARGV[4])
local listed = {}
for i = 1, n do listed[i] = s(tonumber(ARGV[4 + i])) end
removed = removed + remove_records(m, listed)
local at = 5 + n
local passed = {}
for i = 1, tonumber(ARGV[at]) do passed[i] = s(tonumber(ARGV[at + i])) end
m.lt = m.lt + remove_records(m, passed)
if confirmed >= 0 then m.lc = math.max(m.lc, math.min(confirmed, m.lt)) end
if now > m.touch then m.touch = now end
local file_idle = -1
if m.touch - m.filed >= FILE_EVERY then
  m.filed = m.touch
  file_idle = m.touch
end
refresh_ttls(m, now)
save_meta(m)
return {removed, before - m.bytes, file_idle, m.head}
