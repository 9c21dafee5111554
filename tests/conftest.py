import sys
from pathlib import Path

# tests/ holds helper modules (models.py, tiny_tokenizer.py) imported by name.
sys.path.insert(0, str(Path(__file__).parent))
