"""Exit codes of `medclipsam segment`, for scripts; kept free of heavy imports so that --help stays instant."""
from __future__ import annotations

OK = 0
FAILURES = 1
NOTHING_RAN = 2
INTERRUPTED = 130

HELP = f"""Exit codes:
  {OK:<4} every scan segmented (or found already done) and every --prompt known
  {FAILURES:<4} some scans or prompts failed (listed in the summary); all the others were done
  {NOTHING_RAN:<4} nothing could be done: bad arguments, an unusable --out (a file, an input folder or inside one,
       not writable, or in use by another run), no known --prompt, no scan could be segmented, or the model is
       missing or unusable
  {INTERRUPTED:<4} interrupted (Ctrl-C or SIGTERM, at any time); re-run the same command to finish only the missing
       scans"""
