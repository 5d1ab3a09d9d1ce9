import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
# DeepSpeed's CPU accelerator for the in-process tests, only where there is no CUDA device: on a GPU machine
# (`pytest -m gpu`, bench/gpu/run.sh) nothing here may steer DeepSpeed to the CPU. Children get their environment
# from cli_proc.cli_env(), which follows the same rule.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "UPCYCLE_DS_DATA_CACHE" not in os.environ:  # the tokenised-data cache of this test session (and its ranks)
    os.environ["UPCYCLE_DS_DATA_CACHE"] = tempfile.mkdtemp(prefix="upcycle_ds_data_cache-")
    atexit.register(shutil.rmtree, os.environ["UPCYCLE_DS_DATA_CACHE"], True)
