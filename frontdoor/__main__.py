"""python -m meshrt.frontdoor: the front door process (started by the supervisor)."""

from .server import main

raise SystemExit(main())
