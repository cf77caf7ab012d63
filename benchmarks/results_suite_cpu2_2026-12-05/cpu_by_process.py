"""CPU seconds by process title while a command runs (the machine otherwise idle): /proc sampled every 0.5 s,
utime+stime at each process's last sample, under its title then. The command's output goes to cpu_by_process_cmd.log.
    python cpu_by_process.py python3 -m pytest -q --durations=0"""
import os, subprocess, sys, time, collections
tick = os.sysconf("SC_CLK_TCK")
seen = {}
me = os.getpid()
p = subprocess.Popen(sys.argv[1:], stdout=open("cpu_by_process_cmd.log", "w"), stderr=subprocess.STDOUT)
def scan():
    for d in os.listdir("/proc"):
        if not d.isdigit(): continue
        try:
            st = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError: continue
        f = st.rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / tick
        start = int(f[19])
        seen[(d, start)] = (cmd[:110], cpu)
base = {}
scan(); base = dict(seen); seen.clear()
t0 = time.time()
while p.poll() is None:
    scan(); time.sleep(0.5)
for _ in range(10): scan(); time.sleep(0.5)
agg = collections.defaultdict(lambda: [0.0, 0])
for k, (cmd, cpu) in seen.items():
    if k in base: cpu -= base[k][1]
    if cpu < 0.05: continue
    key = cmd.split(" ")[0] if not cmd.startswith("ray::") else cmd.split(" ")[0]
    if "python" in key: key = " ".join(cmd.split(" ")[:3])[:100]
    agg[key][0] += cpu; agg[key][1] += 1
tot = sum(v[0] for v in agg.values())
print(f"rc={p.returncode} wall={time.time()-t0:.1f} cpu={tot:.1f}")
for k, (c, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:30]:
    print(f"{c:7.1f} {n:3d}  {k}")
