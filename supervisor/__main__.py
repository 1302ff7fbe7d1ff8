"""`python -m supervisor` is `oom-supervisor`."""

import sys

from supervisor.cli import main

sys.exit(main())
