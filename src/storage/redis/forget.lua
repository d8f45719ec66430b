-- Makes the queue's next step file its index entries again (an index write failed).
local m = load_meta()
if not m then return 0 end
m.filed = -1
m.xi = -1
save_meta(m)
return 0
