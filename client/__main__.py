"""``python -m layertap.client``: the same as the ``layertap`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
