"""Make the hand-built-table helpers (spp_rig.py) importable under any pytest import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
