-- ARGV: now, budget. Removes up to `budget` expired records, each counted as lost.
-- Returns {removed, bytes freed, earliest deadline left (-1 = none)}.
local err = wrong_type()
if err then return err end
local m = load_meta()
if not m then return {0, 0, -1} end
local due = redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local before, removed = m.bytes, 0
for _, seq in ipairs(due) do
  if remove_record(m, seq) then
    m.lt = m.lt + 1
    removed = removed + 1
  end
end
if removed > 0 then save_meta(m) end
return {removed, before - m.bytes, earliest_deadline()}
