-- ARGV: now, budget. Removes up to `budget` expired records, each counted as lost: first
-- the exceptions that are due, then from the front of the log, where records not listed as
-- exceptions are in deadline order (so the walk stops at the first that is not due).
-- Returns {removed, bytes freed, earliest deadline left (-1 = none), entries examined}: the
-- caller files the queue under it.
local m = load_meta()
if not m then return {0, 0, -1, 0} end
local now, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local before, removed, examined = m.bytes, 0, 0
if m.ex > 0 then
  local due = redis.call('ZRANGEBYSCORE', EXCEPTIONS, '-inf', ARGV[1], 'LIMIT', 0, budget)
  examined = examined + #due
  if #due > 0 then
    removed = remove_records(m, due)
    -- Entries of records the queue no longer holds go too, so purging always progresses.
    m.ex = math.max(m.ex - call_chunked('ZREM', EXCEPTIONS, due), 0)
    if m.ex == 0 then redis.call('DEL', EXCEPTIONS) end
  end
end
-- The front is read in chunks that start small and double: a queue whose first record is not
-- due costs a read of a few records, not of a hundred.
local chunk = 8
while removed < budget and m.live > 0 do
  local n = math.min(budget - removed, chunk)
  chunk = math.min(chunk * 2, 128)
  local front = redis.call('LRANGE', LOG, 0, n - 1)
  examined = examined + #front
  local through, stopped = -1, false
  for i, record in ipairs(front) do
    if record ~= '' then
      local deadline = #record >= HEADER and deadline_of(record) or 0
      if deadline <= 0 or deadline > now then
        stopped = true
        break
      end
    end
    through = m.head + i - 1
  end
  if through >= 0 then removed = removed + remove_through(m, through) end
  if stopped or through < 0 or #front < n then break end
end
m.lt = m.lt + removed
m.xi = earliest_deadline(m)
save_meta(m)
return {removed, before - m.bytes, m.xi, examined}
