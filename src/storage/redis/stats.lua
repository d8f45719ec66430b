-- Returns {live, bytes, unconfirmed losses, oldest record or false, newest seq or -1}.
local m = load_meta()
if not m then return {0, 0, 0, false, -1} end
local oldest, newest = false, -1
if m.live > 0 then
  oldest = redis.call('LINDEX', LOG, 0) or false
  -- The newest record: the last element that is not a tombstone.
  local to = m.seq - m.head
  while to >= 0 and newest < 0 do
    local from = math.max(to - 31, 0)
    local tail = redis.call('LRANGE', LOG, from, to)
    for i = #tail, 1, -1 do
      if tail[i] ~= '' then
        newest = m.head + from + i - 1
        break
      end
    end
    to = from - 1
  end
end
return {m.live, m.bytes, m.lt - m.lc, oldest, newest}
