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
redis.call('DEL', META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT)
-- Metadata kept after acks emptied the queue (nothing pending, no loss to report) is
-- cleared without counting a queue removed: the other backends keep no row for it. Its
-- dedup ids are past their window (the engine's idle timeout is at least the window).
if m.live <= 0 and m.lt <= m.lc then return {-1, 0, 0} end
return {-2, m.live, m.bytes}
