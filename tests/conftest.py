import os
import sys

# Tests import the library from the checkout they live in.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
