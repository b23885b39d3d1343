"""``python -m ce_dynamics.analysis RESULTS.jsonl``: the scaling report (see ``ce_dynamics.analysis.report``)."""

import sys

from ce_dynamics.analysis.report import main

sys.exit(main())
