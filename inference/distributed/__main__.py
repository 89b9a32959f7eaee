"""``python -m elbolab.inference.distributed`` (or under ``torchrun ... -m``): the console."""

from elbolab.inference.distributed.console import main

raise SystemExit(main())
