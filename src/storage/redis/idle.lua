-- ARGV: idle before (ms). Removes the queue whole if untouched since then.
-- Returns {-1, 0, 0} when there is no queue (or it holds nothing), {touch, 0, 0} when it is
-- active (the caller files it under that), {-2, records removed, bytes freed} when it was
-- removed.
local m = load_meta()
if not m then return {-1, 0, 0} end
if m.touch >= tonumber(ARGV[1]) then
  m.filed = m.touch
  save_meta(m)
  return {m.touch, 0, 0}
end
if m.live <= 0 and m.lt <= m.lc then
  -- Nothing pending and no loss to report: no queue to remove, as on the other backends. Its
  -- dedup ids stay for their window and the keys' TTLs clear the rest; unfiled, so that the
  -- next append files it again.
  m.filed = -1e15
  save_meta(m)
  return {-1, 0, 0}
end
redis.call('DEL', META, ORDER, BODIES, DEADLINES, DELIVERIES, DEDUP, DEDUP_AT)
return {-2, m.live, m.bytes}
