import sys
from pathlib import Path

# The reference integrator lives beside the tests and is shared with the benchmarks.
sys.path.insert(0, str(Path(__file__).parent))
