"""``python -m layertap.client.cli``: the same as the ``layertap`` command."""

from __future__ import annotations

from . import main

raise SystemExit(main())
