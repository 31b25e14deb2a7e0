"""Launch tests import tests/launch/launch_helpers.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
