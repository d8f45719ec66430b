-- Removes the recipient's queue and metadata. Returns {records removed, bytes freed}.
local err = wrong_type()
if err then return err end
local m = load_meta()
if not m then return {0, 0} end
for i = 1, 7 do redis.call('DEL', KEYS[i]) end
return {m.live, m.bytes}
