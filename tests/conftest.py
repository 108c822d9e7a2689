import pathlib
import sys

# The dense ground-truth helpers live beside the tests.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
