"""``python -m vision_host`` runs the ``vision-host`` command."""

from .cli import main

raise SystemExit(main())
