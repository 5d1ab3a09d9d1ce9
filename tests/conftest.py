import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "UPCYCLE_DS_DATA_CACHE" not in os.environ:  # the tokenised-data cache of this test session (and its ranks)
    os.environ["UPCYCLE_DS_DATA_CACHE"] = tempfile.mkdtemp(prefix="upcycle_ds_data_cache-")
    atexit.register(shutil.rmtree, os.environ["UPCYCLE_DS_DATA_CACHE"], True)
