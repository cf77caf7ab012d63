"""Print the README's two commands, one a line: the single-line bodies of the first two ```bash blocks under the
heading that names them ("... the two commands")."""

import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
section = re.split(r"^#+ .*the two commands.*$", text, maxsplit=1, flags=re.M | re.I)
if len(section) != 2:
    sys.exit(f"{sys.argv[1]}: no heading naming 'the two commands'")
blocks = re.findall(r"^```bash\n(.*?)^```", section[1], flags=re.M | re.S)[:2]
for block in blocks:
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        sys.exit(f"{sys.argv[1]}: a command block of the two commands holds {len(lines)} commands, not 1")
    print(lines[0])
