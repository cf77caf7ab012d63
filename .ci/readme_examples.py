"""Run every example of README.md's tour, in order and as written, in this checkout, and say how each ended.

    python3 .ci/readme_examples.py [--log-dir DIR]

Needs what the README's first command gives: asd-ray installed and the demo run in runs/demo. One stand-in:
``/ckpt/hubert-base-ls960`` (a checkpoint the user has) becomes a tiny random HuBERT in its real format
(tests/tiny.py). ``asd-ray serve`` (which serves until Ctrl-C) runs in the background while the commands after it
(the README's "from another terminal") run; then it gets a Ctrl-C and must end cleanly. A ``curl`` must get a
score back. Each command's console output goes to DIR/NN.log; the summary says its exit status, its time and
whether it showed progress (a bar) on the console. Exits 1 when a command failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "/ckpt/hubert-base-ls960"


def tour_commands(readme: Path) -> list[str]:
    """The commands of the ```bash blocks between "A quick tour" and the next level-2 heading (continued lines
    joined)."""
    text = readme.read_text(encoding="utf-8")
    tour = re.split(r"^## A quick tour\s*$", text, maxsplit=1, flags=re.M)[1]
    tour = re.split(r"^## ", tour, maxsplit=1, flags=re.M)[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", tour, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args()
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="readme-examples-"))
    logs.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "runs/demo/banks").is_dir():
        sys.exit("runs/demo/banks: run the README's first command first (its demo run)")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny_encoder

    checkpoint = logs / "tiny-hubert"
    save_tiny_encoder("hubert", checkpoint)
    failed = 0
    rows = []
    server = None  # (process, log, start) of a running `asd-ray serve`

    def report(rc, seconds: float, command: str, log: Path, ok: bool) -> None:
        nonlocal failed
        shown = log.read_text(errors="replace")
        progress = bool(re.search(r"\d+/\d+|%\|", shown))
        failed += not ok
        rows.append(command)
        print(f"{'ok  ' if ok else 'FAIL'} rc={rc} {seconds:7.1f} s progress={'yes' if progress else 'no '}  "
              f"{command[:90]}{'...' if len(command) > 90 else ''} -> {log.name}", flush=True)
        if not ok:
            print(shown[-3000:], flush=True)

    def stop_server() -> None:
        proc, log, start = server
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: to the foreground process group
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "hung after Ctrl-C"
        shown = log.read_text(errors="replace")
        ok = rc == 0 and "stopped" in shown and "Traceback" not in shown and "(raylet)" not in shown
        report(rc, time.monotonic() - start, "(Ctrl-C) asd-ray serve", log, ok)

    for i, command in enumerate(tour_commands(ROOT / "README.md"), 1):
        command = command.replace(CHECKPOINT, str(checkpoint))
        log = logs / f"{i:02d}.log"
        start = time.monotonic()
        if command.startswith("asd-ray serve ") and "--stop" not in command:
            out = open(log, "w")
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            server = (proc, log, start)
            while proc.poll() is None and "serving until Ctrl-C" not in log.read_text(errors="replace"):
                if time.monotonic() - start > 900:
                    break
                time.sleep(1)
            report(proc.poll(), time.monotonic() - start, command, log, proc.poll() is None)
            continue
        with open(log, "w") as out:
            rc = subprocess.call(["bash", "-c", command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=3600)
        ok = rc == 0 and (not command.startswith("curl") or '"score"' in log.read_text(errors="replace"))
        report(rc, time.monotonic() - start, command, log, ok)
    if server is not None:
        stop_server()
    print(f"{len(rows) - failed} of {len(rows)} README examples ran as written; logs in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
