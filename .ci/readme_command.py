"""Print command N (0: main job, 1: tests) of the README's "fresh machine" section, as a new user copies it."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text()
heading = re.search(r"^#+ .*fresh machine.*$", text, re.M | re.I)
if heading is None:
    sys.exit("README.md has no 'fresh machine' heading")
commands = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text[heading.end() :], re.S)[:2]
if len(commands) < 2:
    sys.exit("README.md's fresh-machine section has fewer than two commands")
print(commands[int(sys.argv[2])].strip())
