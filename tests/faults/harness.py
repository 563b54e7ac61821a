"""Run one stage the way a container does (``python -m patchgap.stages.<name>``), and SIGKILL
it on its Nth write to the store, or on the write of an output's manifest.

    python harness.py KILL STAGE [stage arguments...]

KILL is ``0`` (never), a write number (1-based, counting every ``put_file`` and ``put_bytes``), or
``manifest`` (the first write of a ``_manifest.json``: every object of that output is written,
its manifest is not). The kill is a real SIGKILL: no ``finally`` blocks, no flushes.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def main() -> int:
    kill, stage_name, *args = sys.argv[1:]
    from patchgap.stages.base import main as stage_main
    from patchgap.storage.store import MANIFEST_NAME, Store

    writes = 0

    def hooked(method):
        def write(self, first, uri):
            nonlocal writes
            writes += 1
            is_manifest = str(uri).endswith(MANIFEST_NAME)
            if (kill == "manifest" and is_manifest) or (kill.isdigit() and writes == int(kill)):
                os.kill(os.getpid(), signal.SIGKILL)
            return method(self, first, uri)

        return write

    Store.put_file = hooked(Store.put_file)
    Store.put_bytes = hooked(Store.put_bytes)
    return stage_main(importlib.import_module(f"patchgap.stages.{stage_name}"), args)


if __name__ == "__main__":
    raise SystemExit(main())
