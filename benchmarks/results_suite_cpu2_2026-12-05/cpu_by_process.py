"""CPU seconds by process title while a command runs (the machine otherwise idle): /proc sampled every 0.5 s,
utime+stime at each process's last sample, under its title then. The command's output goes to cpu_by_process_cmd.log.
    python cpu_by_process.py python3 -m pytest -q --durations=0"""

import collections
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def scan() -> dict[tuple[str, int], tuple[str, float]]:
    """{(pid, start time): (command line, CPU seconds so far)} of every process now alive."""
    seen = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        seen[(pid, int(stat[19]))] = (cmd[:110], (int(stat[11]) + int(stat[12])) / TICK)
    return seen


def title(cmd: str) -> str:
    """What a process is counted under: its program (``ray::<task>`` for Ray's workers), a Python one's first
    arguments too."""
    key = cmd.split(" ")[0]
    return " ".join(cmd.split(" ")[:3])[:100] if "python" in key else key


def main(argv: list[str]) -> None:
    base = scan()  # what ran before the command: only its CPU since counts
    with open("cpu_by_process_cmd.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        t0, last = time.time(), {}
        while proc.poll() is None:
            last.update(scan())
            time.sleep(0.5)
    for _ in range(10):  # the command's processes that outlive it (Ray's, shutting down)
        last.update(scan())
        time.sleep(0.5)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for key, (cmd, cpu) in last.items():
        cpu -= base[key][1] if key in base else 0.0
        if cpu >= 0.05:
            totals[title(cmd)][0] += cpu
            totals[title(cmd)][1] += 1
    print(f"rc={proc.returncode} wall={time.time() - t0:.1f} cpu={sum(c for c, _ in totals.values()):.1f}")
    for name, (cpu, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{cpu:7.1f} {n:3d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
