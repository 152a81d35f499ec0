#!/usr/bin/env python
"""Real-time ultrasound demo: move a virtual probe through a brain and watch the B-mode live.

Same code and options as ``diffus-taichi demo`` (see ``--help`` and demos/README.md), e.g.

    python demos/realtime.py                                  # brain, craniotomy probe
    python demos/realtime.py --volume phantom --arch vulkan
    python demos/realtime.py --headless --frames 300 --path scripted --record frames/
"""
import os
import sys

# also works from an uninstalled checkout
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffus_taichi.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
