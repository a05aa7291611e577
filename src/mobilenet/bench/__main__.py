"""A worker of ``mobilenet bench``: ``python -m mobilenet.bench ENGINE CONFIG_JSON``."""

import json
import sys

from .run import worker
from .setup import BenchConfig

worker(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))
