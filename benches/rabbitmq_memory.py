"""Prints a RabbitMQ node's memory: `erlang:memory()` (read from stdin) and the RSS of the pid
given as the argument. Used by amqp_scale.sh."""
import re
import sys

m = {k: int(v) for k, v in re.findall(r"\{(\w+),(\d+)\}", sys.stdin.read())}
status = open(f"/proc/{sys.argv[1]}/status").read()
rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) * 1024
mb = lambda b: f"{b / 2**20:.0f} MiB"
print(f"total {mb(m['total'])} (rss {mb(rss)}), processes {mb(m['processes'])}, "
      f"ets {mb(m['ets'])}, binary {mb(m['binary'])}")
