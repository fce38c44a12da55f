"""Run a command; print its peak resident memory in MB (the largest of it and its children).

    python peak_rss.py OUT_FILE CMD ARGS...

A fresh process, so the reading covers this command alone (RUSAGE_CHILDREN accumulates over
every child a process has waited for). Exits with the command's status; OUT_FILE gets the
number (Linux reports ru_maxrss in KiB).
"""

import resource
import subprocess
import sys

status = subprocess.call(sys.argv[2:])
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as f:
    f.write(f"{peak_kib / 1024:.1f}\n")
sys.exit(status)
